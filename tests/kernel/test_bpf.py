"""The cgroup-bpf layer on the real kernel, alone: no nftables and no policy routing in the
client namespace (which is also "someone flushed the whole ruleset": BPF alone holds).

Topology (tests.kernel.uplink's, plan BPF):

    client netns                       far netns (counts what arrives, per address/proto/port)
      up0  10.77.0.1 fd77::1  <-veth->  fu0  10.77.0.2 10.77.0.3 fd77::2     (the uplink)
      wgXX 10.88.0.1 fd88::1  <-veth->  ft0  10.88.0.2 10.88.0.3 fd88::2     (named as a tunnel)

Senders (tests.kernel.sender) run inside cgroups below a test-made cgroup (the attach
point) and inside the client netns. Every case is judged by ksbpf.verdict, the oracle, and the kernel must agree:
allowed packets arrive in the far netns, dropped ones fail with EPERM, never arrive, and
are counted under exactly their reason and cgroup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from ksbpf.errors import BpfError
from ksbpf.linux.bpf import generations as bpf_generations
from ksbpf.linux.bpf import kernel as bpf_kernel
from ksbpf.linux.bpf import layout as bpf_layout
from ksbpf.linux.bpf import loader as bpf_loader
from ksbpf.linux.bpf import plan as bpf_plan
from ksbpf.linux.bpf.kernel import ATTACH_EGRESS, ATTACH_SOCK_CREATE
from ksbpf.linux.bpf.layer import BpfLayer
from ksbpf.linux.cgroup import cgroup_id
from ksbpf.linux.libbpf import prog_detach, prog_fd_by_id, prog_query
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids
from ksbpf.policy import Endpoint, Exemption, Policy, loads_policy, merge_exemptions, parse_port_spec
from ksbpf.render import bpf as bpf_render
from ksbpf.verdict import Packet, verdict
from tests.kernel.conftest import CgroupFactory, NetnsFactory, sh, spawn_in, unique
from tests.kernel.sender import Probe, send, send_all, start_stream, stream_counts
from tests.kernel.uplink import BPF, build_uplink, veth

pytestmark = pytest.mark.kernel

PY = sys.executable
ENDPOINT_MARK = 0xCA6C


def _supported() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root"
    return BpfLayer("probe").is_supported()


_SUPPORTED = _supported()
requires_bpf = pytest.mark.skipif(not _SUPPORTED[0], reason=f"BPF layer unsupported here: {_SUPPORTED[1]}")


def _netns_modes() -> list[str]:
    modes = ["sk_storage"]
    if os.geteuid() == 0 and bpf_kernel.probe_netns_cookie_helper():
        modes.insert(0, "helper")
    return modes


FAR_NFT = """
table netdev ksfar {{
  set up4 {{ type ipv4_addr . inet_proto . inet_service; flags dynamic; size 65535; counter; }}
  set up6 {{ type ipv6_addr . inet_proto . inet_service; flags dynamic; size 65535; counter; }}
  set tun4 {{ type ipv4_addr . inet_proto . inet_service; flags dynamic; size 65535; counter; }}
  set tun6 {{ type ipv6_addr . inet_proto . inet_service; flags dynamic; size 65535; counter; }}
  chain up {{
    type filter hook ingress device "{up}" priority 0;
    meta protocol ip meta l4proto {{ tcp, udp }} update @up4 {{ ip daddr . meta l4proto . th dport }}
    meta protocol ip6 meta l4proto {{ tcp, udp }} update @up6 {{ ip6 daddr . meta l4proto . th dport }}
  }}
  chain tun {{
    type filter hook ingress device "{tun}" priority 0;
    meta protocol ip meta l4proto {{ tcp, udp }} update @tun4 {{ ip daddr . meta l4proto . th dport }}
    meta protocol ip6 meta l4proto {{ tcp, udp }} update @tun6 {{ ip6 daddr . meta l4proto . th dport }}
  }}
}}
"""


@dataclass
class Lab:
    client: str
    far: str
    tun: str
    cgroups: CgroupFactory
    dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.cgroups.root

    def rel(self, name: str) -> str:
        return self.cgroups.rel(self.dirs[name])

    def send(self, cgroup: str, sends: list[dict[str, Any]], netns: str | None = None) -> list[dict[str, int]]:
        """Each send ({dst, port, n, sport, mark}) through the shared sender, from one process in
        `cgroup`: {"ok", "eperm", "mark"} per send (any error but EPERM fails the test)."""
        probes = [Probe(str(x["dst"]), int(x["port"]), int(x.get("n", 1)), sport=int(x.get("sport") or 0),
                        mark=int(x.get("mark") or 0), payload="ksbpf-test") for x in sends]
        out = []
        for r in send_all(netns or self.client, probes, cgroup=self.dirs[cgroup]).results:
            assert set(r.errors) <= {"EPERM"}, r.errors
            out.append({"ok": r.sent, "eperm": r.eperm, "mark": r.mark})
        return out

    def far_counts(self) -> Counter[tuple[str, str, str, int]]:
        """(device 'up'|'tun', dst, proto, dport) -> packets arrived in the far netns."""
        out: Counter[tuple[str, str, str, int]] = Counter()
        for dev in ("up", "tun"):
            for fam in ("4", "6"):
                r = sh("nft", "-j", "list", "set", "netdev", "ksfar", dev + fam, netns=self.far)
                for obj in json.loads(r.stdout)["nftables"]:
                    for e in obj.get("set", {}).get("elem", []):
                        dst, proto, port = e["elem"]["val"]["concat"]
                        out[(dev, str(ip_address(dst)), proto, int(port))] += e["elem"]["counter"]["packets"]
        return out


@pytest.fixture
def lab(make_netns: NetnsFactory, make_cgroup: CgroupFactory) -> Lab:
    u = build_uplink(make_netns, plan=BPF)
    sh("nft", "-f", "-", netns=u.far, input=FAR_NFT.format(up="fu0", tun="ft0"))
    lab = Lab(u.client, u.far, u.tun_if, make_cgroup)
    for name in ("w", "w/app", "w/other", "w/ex", "w/ex/child", "w/ep", "w/svc"):
        lab.dirs[name] = make_cgroup(name)
    lab.dirs["root"] = make_cgroup.root
    return lab


@pytest.fixture
def layers(lab: Lab) -> Iterator[list[BpfLayer]]:
    """BpfLayers made by a test; reset (detached, unpinned) afterwards, also on failure."""
    made: list[BpfLayer] = []
    try:
        yield made
    finally:
        for layer in made:
            try:
                layer.reset(cgroup=lab.cgroups.rel(lab.root))
            except BpfError:
                pass


def new_layer(lab: Lab, layers: list[BpfLayer], mode: str = "auto") -> BpfLayer:
    layer = BpfLayer(unique("kst-"), netns=lab.client, netns_mode=mode)
    layers.append(layer)
    return layer


def make_policy(lab: Lab, extra: str = "", attach: str | None = None, ipv6: str = "tunnel",
                lan: str = "allow = false") -> Policy:
    return loads_policy(
        f"""
[tunnel]
interfaces = ["wg*"]
endpoints = ["10.77.0.2:51820/udp"]
endpoint_mark = {ENDPOINT_MARK}
endpoint_cgroups = ["{lab.rel('w/ep')}"]

[dns]
servers = ["10.88.0.2"]

[lan]
{lan}

[ipv6]
mode = "{ipv6}"

[bpf]
cgroup = "{attach or lab.cgroups.rel(lab.root)}"

[[exempt]]
cgroup = "{lab.rel('w/ex')}"
allow = ["udp/5300-5310", "tcp/443"]
to = ["10.77.0.2/32", "fd77::2/128"]

[[exempt]]
cgroup = "{lab.rel('w/svc')}"
listen = ["udp/5353", "tcp/2222"]
from = ["10.77.0.2/32"]
{extra}
"""
    )


def oif_for(lab: Lab, dst: str) -> str:
    if dst.startswith(("127.", "::1")):
        return "lo"
    return lab.tun if dst.startswith(("10.88.", "fd88:")) else "up0"


def far_key(dst: str, port: int) -> tuple[str, str, str, int]:
    dev = "tun" if dst.startswith(("10.88.", "fd88:")) else "up"
    return (dev, str(ip_address(dst)), "udp", port)


def expected_mark(lab: Lab, policy: Policy, cgroup: str, explicit: int) -> int:
    if explicit:
        return explicit
    rel = lab.rel(cgroup)
    ids = exemption_ids([e.cgroup for e in policy.exemptions])
    best = max((e.cgroup for e in policy.exemptions if rel == e.cgroup or rel.startswith(e.cgroup + "/")),
               key=len, default=None)
    if best is not None:
        return exempt_mark(ids[best])
    t = policy.tunnel
    if t.endpoint_mark is None and any(rel == c or rel.startswith(c + "/") for c in t.endpoint_cgroups):
        return DEFAULT_ENDPOINT_MARK
    return 0


@dataclass(frozen=True)
class Case:
    cgroup: str
    dst: str
    port: int
    sport: int = 0
    mark: int = 0
    n: int = 3


# Each case uses its own (dst, port), so far-side counts are per case.
CASES = [
    Case("w/app", "127.0.0.1", 6001),  # loopback
    Case("w/app", "10.88.0.2", 6002),  # via the tunnel
    Case("w/app", "fd88::2", 6003),
    Case("w/app", "10.77.0.2", 6004),  # uplink: no_tunnel
    Case("w/app", "fd77::2", 6005),
    Case("w/app", "10.88.0.2", 53),  # DNS to the configured resolver via the tunnel
    Case("w/app", "10.88.0.3", 53),  # DNS elsewhere via the tunnel: dns
    Case("w/app", "10.77.0.3", 853),  # DoT out of the uplink: dns
    Case("w/app", "10.77.0.2", 67, sport=68),  # DHCP
    Case("w/ep", "10.77.0.2", 51820, mark=ENDPOINT_MARK),  # the endpoint, both conditions
    Case("w/ep", "10.77.0.2", 51820, n=2),  # endpoint cgroup without the mark
    Case("w/app", "10.77.0.2", 51820, mark=ENDPOINT_MARK, n=4),  # root forging the mark elsewhere
    Case("w/ex", "10.77.0.2", 5300),  # exempt: granted range and network
    Case("w/ex", "10.77.0.2", 5310),
    Case("w/ex/child", "10.77.0.2", 5305),  # a descendant inherits it
    Case("w/ex", "fd77::2", 5306),
    Case("w/ex", "10.77.0.2", 5311),  # other port
    Case("w/ex", "10.77.0.3", 5301),  # other network
    Case("w/ex", "10.77.0.2", 53),  # DNS is not granted
    Case("w/other", "10.77.0.2", 5302),  # other cgroup
    Case("w/svc", "10.77.0.2", 40001, sport=5353),  # listen: a reply to a granted source
    Case("w/svc", "10.77.0.3", 40002, sport=5353),  # ...not to others
    Case("w/svc", "10.77.0.2", 40003, sport=5354),  # ...nor from another port
]


def run_cases(lab: Lab, layer: BpfLayer, policy: Policy, cases: list[Case]) -> None:
    before_far = lab.far_counts()
    before = {(r, c): p for r, c, p, _ in layer.counters()}
    want_drops: Counter[tuple[str, int]] = Counter()
    want_far: Counter[tuple[str, str, str, int]] = Counter()
    results = []
    for case in cases:
        mark = expected_mark(lab, policy, case.cgroup, case.mark)
        pkt = Packet("out", "udp", ip_address(case.dst), sport=case.sport or 40000, dport=case.port,
                     oif=oif_for(lab, case.dst), mark=mark, cgroup=lab.rel(case.cgroup))
        v = verdict(policy, pkt)
        (res,) = lab.send(case.cgroup, [{"dst": case.dst, "port": case.port, "sport": case.sport,
                                         "mark": case.mark, "n": case.n}])
        results.append((case, v, res))
        assert res["mark"] == mark, f"{case}: socket mark {res['mark']:#x}, expected {mark:#x}"
        if v.allow:
            assert res == {"ok": case.n, "eperm": 0, "mark": mark}, f"{case} ({v}): {res}"
            if oif_for(lab, case.dst) != "lo":
                want_far[far_key(case.dst, case.port)] += case.n
        else:
            assert res == {"ok": 0, "eperm": case.n, "mark": mark}, f"{case} ({v}): {res}"
            want_drops[(v.reason.value, cgroup_id(lab.dirs[case.cgroup]))] += case.n

    deadline = time.monotonic() + 3
    while True:
        far = lab.far_counts() - before_far
        if all(far[k] >= n for k, n in want_far.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # let anything that should not arrive arrive
    far = lab.far_counts() - before_far
    leaked = {k: n for k, n in far.items() if k[3] in {c.port for c in cases} and k not in want_far}
    assert not leaked, f"packets arrived that the oracle drops: {leaked}"
    for k, n in want_far.items():
        assert far[k] == n, f"{k}: {far[k]} arrived, expected {n}"

    after = {(r, c): p for r, c, p, _ in layer.counters()}
    got = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(want_drops)}
    assert {k: v for k, v in got.items() if v} == dict(want_drops)


@requires_bpf
@pytest.mark.parametrize("mode", _netns_modes())
def test_kernel_agrees_with_the_oracle_and_counts_exactly(lab: Lab, layers: list[BpfLayer], mode: str) -> None:
    layer = new_layer(lab, layers, mode)
    policy = make_policy(lab)
    stats = layer.apply(policy)
    assert stats.load.netns_mode == mode
    assert layer.status()[0], layer.status()[1]
    run_cases(lab, layer, policy, CASES)


@requires_bpf
def test_ipv6_block_and_lan(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab, ipv6="block", lan='allow = true\nnetworks = ["10.77.0.0/24", "fd77::/64"]')
    layer.apply(policy)
    run_cases(lab, layer, policy, [
        Case("w/app", "fd88::2", 6101),  # ipv6_blocked even via the tunnel
        Case("w/app", "fd77::2", 6102),  # ...and on the LAN
        Case("w/ex", "fd77::2", 5301),  # ...and for exemptions
        Case("w/app", "10.77.0.2", 6103),  # LAN allowed
        Case("w/app", "10.77.0.2", 53),  # a LAN resolver is still a DNS leak
        Case("w/app", "10.88.0.2", 6104),
    ])


SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8); print("ready", flush=True)
    while True:
        c, _ = s.accept(); c.sendall(b"hello"); c.close()
    """
)


def connect(netns: str, src: str, dst: str, port: int) -> str:
    """One TCP connection from src: what the server said, or why there was no answer."""
    r = send(netns, dst, port, proto="tcp", bind=src, answer=True, timeout=1.5)
    return r.answers[0] if r.answers else next(iter(r.errors))


@requires_bpf
@pytest.mark.parametrize("mode", _netns_modes())
def test_other_netns_is_not_judged(lab: Lab, layers: list[BpfLayer], mode: str) -> None:
    """The program sees the cgroup's sockets in every netns; it judges only its own."""
    layer = new_layer(lab, layers, mode)
    layer.apply(make_policy(lab, ipv6="block"))
    # From the far netns (where fu0/ft0 have other ifindexes), inside the same cgroups.
    res = lab.send("w/app", [{"dst": "10.77.0.1", "port": 6201, "n": 2}], netns=lab.far)
    assert res == [{"ok": 2, "eperm": 0, "mark": 0}]
    # A device there with the tunnel's ifindex takes the program's tunnel path, whose
    # drops (DNS elsewhere, IPv6 blocked) must not apply to another netns either.
    (tun_index,) = json.loads(sh("ip", "-n", lab.client, "-j", "link", "show", lab.tun).stdout)
    far_links = {link["ifindex"]: link["ifname"] for link in json.loads(sh("ip", "-n", lab.far, "-j", "link").stdout)}
    dev = far_links.get(tun_index["ifindex"], "ksx")
    if dev == "ksx":
        sh("ip", "-n", lab.far, "link", "add", dev, "index", str(tun_index["ifindex"]), "type", "dummy")
        for a in ("10.99.0.1/24", "fd99::1/64"):
            sh("ip", "-n", lab.far, "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []))
        sh("ip", "-n", lab.far, "link", "set", dev, "up")
    dst4, dst6 = {"fu0": ("10.77.0.1", "fd77::1"), "ft0": ("10.88.0.1", "fd88::1")}.get(dev, ("10.99.0.2", "fd99::2"))
    res = lab.send("w/app", [{"dst": dst4, "port": 53}, {"dst": dst6, "port": 6204}], netns=lab.far)
    assert res == [{"ok": 1, "eperm": 0, "mark": 0}] * 2, f"via {dev}: {res}"
    res = lab.send("w/ex", [{"dst": "10.77.0.1", "port": 6202}], netns=lab.far)
    assert res == [{"ok": 1, "eperm": 0, "mark": 0}], "exempt marks belong to the target netns only"
    # A TCP server there: its SYN-ACKs leave from a request socket, not a full one.
    server = spawn_in([PY, "-c", SERVER, "6203"], netns=lab.far, cgroup=lab.dirs["w/app"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert connect(lab.client, "10.77.0.1", "10.77.0.2", 6203) == "hello"
    finally:
        server.kill()
        server.wait()
    assert not layer.counters()


@requires_bpf
@pytest.mark.parametrize("mode", _netns_modes())
def test_listen_exemption_accepts_granted_sources_only(lab: Lab, layers: list[BpfLayer], mode: str) -> None:
    layer = new_layer(lab, layers, mode)
    layer.apply(make_policy(lab))
    procs = []
    try:
        for cg, port in (("w/svc", 2222), ("w/app", 2223)):
            p = spawn_in([PY, "-c", SERVER, str(port)], netns=lab.client, cgroup=lab.dirs[cg],
                         stdout=subprocess.PIPE)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

        def from_far(src: str, port: int) -> str:
            return connect(lab.far, src, "10.77.0.1", port)

        assert from_far("10.77.0.2", 2222) == "hello"  # granted source
        assert from_far("10.77.0.3", 2222) == "TimeoutError"  # the SYN-ACK is dropped
        assert from_far("10.77.0.2", 2223) == "TimeoutError"  # a service that is not exempt
    finally:
        for p in procs:
            p.kill()
            p.wait()


@requires_bpf
def test_endpoint_cgroups_without_mark_get_the_default_mark(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = loads_policy(
        f"""
[tunnel]
interfaces = ["wg*"]
endpoints = ["10.77.0.2:51820/udp"]
endpoint_cgroups = ["{lab.rel('w/ep')}"]
[bpf]
cgroup = "{lab.cgroups.rel(lab.root)}"
"""
    )
    layer.apply(policy)
    run_cases(lab, layer, policy, [
        Case("w/ep", "10.77.0.2", 51820),  # marked DEFAULT_ENDPOINT_MARK at creation, allowed
        Case("w/app", "10.77.0.2", 51820, mark=DEFAULT_ENDPOINT_MARK),  # forged: endpoint_unauthorized
    ])


@requires_bpf
def test_icmp_only_neighbour_discovery_leaves_outside_the_tunnel(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    probes = [("fd77::2", 135), ("fd77::2", 136), ("fd77::2", 133), ("fd77::2", 128), ("10.77.0.2", 8),
              ("fd88::2", 128), ("10.88.0.2", 8)]
    sent = send_all(lab.client, [Probe(dst, 0, proto="icmp", icmp_type=t) for dst, t in probes], cgroup=lab.dirs["w/app"])
    got = ["ok" if r.sent else "eperm" if r.errors == {"EPERM": 1} else f"errors {r.errors}" for r in sent.results]
    drops: Counter[str] = Counter()
    for (dst, icmp_type), res in zip(probes, got, strict=True):
        v = verdict(policy, Packet("out", "icmpv6" if ":" in dst else "icmp", ip_address(dst), oif=oif_for(lab, dst),
                                   icmp_type=icmp_type, cgroup=lab.rel("w/app")))
        assert res == ("ok" if v.allow else "eperm"), (dst, icmp_type, v)
        if not v.allow:
            drops[v.reason.value] += 1
    assert drops == {"no_tunnel": 2}
    assert {r: p for r, _, p, _ in layer.counters()} == {"no_tunnel": 2}


def _streams(lab: Lab, seconds: float) -> list[subprocess.Popen[str]]:
    return [
        start_stream(lab.client, [Probe(dst, port, payload="x")], cgroup=lab.dirs["w/app"], seconds=seconds,
                     stdout=subprocess.PIPE)
        for dst, port in (("10.77.0.2", 6301), ("10.88.0.2", 6302))
    ]


def _attached(cg: Path) -> tuple[list[int], list[int]]:
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return prog_query(fd, ATTACH_EGRESS), prog_query(fd, ATTACH_SOCK_CREATE)
    finally:
        os.close(fd)


def header_link(tmp_path: Path) -> str:
    """Another path to the header tree BCC uses: a layer pointed at it builds a new
    generation (the header source is part of what a build depends on)."""
    from ksbpf.linux.headers import resolve_kernel_source

    found = resolve_kernel_source().source
    assert found is not None
    link = tmp_path / "headers-link"
    link.symlink_to(found.path, target_is_directory=True)
    return str(link)


@requires_bpf
def test_replacing_under_traffic_leaks_nothing_and_leaves_one_generation(lab: Lab, layers: list[BpfLayer],
                                                                         tmp_path: Path) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    # The same policy through another header path: the programs are rebuilt every time.
    rebuilding = [BpfLayer(layer.instance, kernel_source=header_link(tmp_path), netns=lab.client), layer]
    before = {(r, c): p for r, c, p, _ in layer.counters()}
    streams = _streams(lab, 6.0)
    hows = []
    try:
        time.sleep(0.3)
        for i in range(3):
            stats = rebuilding[i % 2].apply(policy)
            assert stats.compiled
            hows.append(stats.replacement)
            egress, sock = _attached(lab.root)
            assert len(egress) == 1 and len(sock) == 1, f"after replacement {i}: {egress} {sock}"
        # The attach point moves one level down: make-before-break across cgroups.
        moved = make_policy(lab, attach=lab.rel("w"))
        hows.append(layer.apply(moved).replacement)
        assert _attached(lab.root) == ([], [])
        assert [len(x) for x in _attached(lab.dirs["w"])] == [1, 1]
    finally:
        results = []
        for p in streams:
            (counts,) = stream_counts(p, stop=False)
            assert counts["other"] == 0, counts
            results.append(counts)
    assert hows == ["atomic", "atomic", "atomic", "make-before-break"]
    blocked, tunnel = results
    assert blocked["ok"] == 0 and blocked["eperm"] > 1000, blocked
    assert tunnel["eperm"] == 0 and tunnel["ok"] > 1000, tunnel
    time.sleep(0.3)
    far = lab.far_counts()
    assert far[("up", "10.77.0.2", "udp", 6301)] == 0, "a blocked packet leaked during replacement"
    assert far[("tun", "10.88.0.2", "udp", 6302)] == tunnel["ok"]
    # While two generations overlap (make-before-break), a drop may be counted by both.
    after = {(r, c): p for r, c, p, _ in layer.counters()}
    key = ("no_tunnel", cgroup_id(lab.dirs["w/app"]))
    assert blocked["eperm"] <= after[key] - before.get(key, 0) <= blocked["eperm"] + 10
    assert [p.name for p in layer.dir.iterdir() if p.name.startswith("g")] == [f"g{layer.last_apply.generation}"]  # type: ignore[union-attr]
    assert layer.status()[0]


LOADER = textwrap.dedent(
    """
    import sys, time
    from ksbpf.linux.bpf.layer import BpfLayer
    from ksbpf.policy import load_policy
    layer = BpfLayer(sys.argv[1], netns=sys.argv[2])
    st = layer.apply(load_policy(sys.argv[3]))
    print(st.rss_kb, "bcc" in sys.modules, flush=True)
    time.sleep(3600)
    """
)


@requires_bpf
def test_killed_loader_leaves_programs_attached_and_counting(lab: Lab, layers: list[BpfLayer], tmp_path: Path) -> None:
    layer = new_layer(lab, layers)
    policy_file = tmp_path / "policy.toml"
    policy = make_policy(lab)
    policy_file.write_text(policy_toml(lab))
    proc = subprocess.Popen([PY, "-c", LOADER, layer.instance, lab.client, str(policy_file)],
                            stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[2]))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[1] == "False", "the applying process must not import bcc"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert layer.status()[0], layer.status()
    run_cases(lab, layer, policy, [Case("w/app", "10.77.0.2", 6401, n=5), Case("w/app", "10.88.0.2", 6402)])


def policy_toml(lab: Lab) -> str:
    # make_policy's text, for a process that loads the file.
    return f"""
[tunnel]
interfaces = ["wg*"]
endpoints = ["10.77.0.2:51820/udp"]
endpoint_mark = {ENDPOINT_MARK}
endpoint_cgroups = ["{lab.rel('w/ep')}"]
[dns]
servers = ["10.88.0.2"]
[bpf]
cgroup = "{lab.cgroups.rel(lab.root)}"
[[exempt]]
cgroup = "{lab.rel('w/ex')}"
allow = ["udp/5300-5310", "tcp/443"]
to = ["10.77.0.2/32", "fd77::2/128"]
[[exempt]]
cgroup = "{lab.rel('w/svc')}"
listen = ["udp/5353", "tcp/2222"]
from = ["10.77.0.2/32"]
"""


BCC_ATTACH = textwrap.dedent(
    """
    import os, sys
    from bcc import BPF, BPFAttachType
    b = BPF(text="int f(struct __sk_buff *skb) { return 1; }")
    fn = b.load_func("f", BPF.CGROUP_SKB)
    fd = os.open(sys.argv[1], os.O_RDONLY)
    BPF.attach_func(fn, fd, BPFAttachType.CGROUP_INET_EGRESS, 2)
    print("attached", flush=True)
    os.kill(os.getpid(), 9)
    """
)


@requires_bpf
def test_kernel_fact_bcc_attach_func_outlives_the_process(make_cgroup: CgroupFactory) -> None:
    """DESIGN.md relies on it: a cgroup attachment is not tied to the loader's fds."""
    cg = make_cgroup("bcc-fact")
    src = BpfLayer("probe").is_supported()
    assert src[0]
    env = dict(os.environ)
    from ksbpf.linux.headers import find_kernel_source

    ks = find_kernel_source()
    assert ks is not None
    env.update(ks.env)
    r = subprocess.run([PY, "-c", BCC_ATTACH, str(cg)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -9 and "attached" in r.stdout, r.stderr
    egress, _ = _attached(cg)
    assert len(egress) == 1
    # Detach by id so the cgroup can go.
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    pfd = prog_fd_by_id(egress[0], "test")
    try:
        prog_detach(pfd, fd, ATTACH_EGRESS)
    finally:
        os.close(pfd)
        os.close(fd)


@requires_bpf
def test_tunnel_recreated_with_new_ifindex(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    (first,) = layer.update_tunnel_ifindexes()
    recreate_tunnel(lab)
    # The stale ifindex no longer matches: the new link is blocked until the map follows.
    assert lab.send("w/app", [{"dst": "10.88.0.2", "port": 6501}]) == [{"ok": 0, "eperm": 1, "mark": 0}]
    new = layer.update_tunnel_ifindexes()
    assert len(new) == 1 and first not in new  # ifindexes are allocated cyclically, never reused at once
    run_cases(lab, layer, policy, [Case("w/app", "10.88.0.2", 6502)])


@requires_bpf
def test_tunnel_with_a_large_ifindex(lab: Lab, layers: list[BpfLayer]) -> None:
    """Ifindexes from TUNNEL_INDEX on live in the hash beside the array: same verdicts."""
    big, other = unique("wg"), unique("xg")
    for name, index, net in ((big, bpf_layout.TUNNEL_INDEX + 17, "10.66.0"), (other, bpf_layout.TUNNEL_INDEX + 18, "10.67.0")):
        sh("ip", "-n", lab.client, "link", "add", name, "index", str(index), "type", "veth", "peer", "name", f"p{index}",
           "netns", lab.far)
        sh("ip", "-n", lab.client, "addr", "add", f"{net}.1/24", "dev", name)
        sh("ip", "-n", lab.far, "addr", "add", f"{net}.2/24", "dev", f"p{index}")
        sh("ip", "-n", lab.client, "link", "set", name, "up")
        sh("ip", "-n", lab.far, "link", "set", f"p{index}", "up")
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    assert bpf_layout.TUNNEL_INDEX + 17 in layer.update_tunnel_ifindexes()
    sends = [{"dst": "10.66.0.2", "port": 7501}, {"dst": "10.66.0.2", "port": 53}, {"dst": "10.67.0.2", "port": 7502}]
    assert lab.send("w/app", sends) == [{"ok": 1, "eperm": 0, "mark": 0}, {"ok": 0, "eperm": 1, "mark": 0},
                                        {"ok": 0, "eperm": 1, "mark": 0}]
    # Gone from the policy's patterns in place: the hash entry follows the version.
    narrower = dataclasses.replace(policy, tunnel=dataclasses.replace(policy.tunnel, interfaces=(lab.tun,)))
    assert layer.apply(narrower).changed == ("tunnels",)
    assert lab.send("w/app", sends[:1]) == [{"ok": 0, "eperm": 1, "mark": 0}]
    assert next(c for c in layer.counters() if c[0] == "dns")[2] == 1
    assert layer.status()[0]


@requires_bpf
def test_recreated_exempt_cgroup_keeps_its_exemption(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    old_id = cgroup_id(lab.dirs["w/ex/child"])
    lab.dirs["w/ex/child"].rmdir()
    lab.dirs["w/ex"].rmdir()
    lab.cgroups("w/ex/child")
    assert cgroup_id(lab.dirs["w/ex/child"]) != old_id
    # Until re-resolved, the new cgroup is not exempt (fail closed).
    assert lab.send("w/ex", [{"dst": "10.77.0.2", "port": 5300}])[0]["eperm"] == 1
    resolved = layer.update_exemptions(policy)
    assert resolved[lab.rel("w/ex")] == cgroup_id(lab.dirs["w/ex"])
    run_cases(lab, layer, policy, [Case("w/ex", "10.77.0.2", 5303), Case("w/ex/child", "10.77.0.2", 5304),
                                   Case("w/ex", "10.77.0.2", 5399)])
    # A run-time change of the grant: only what the new policy says.
    narrower = policy.with_exemptions(tuple(
        Exemption(e.cgroup, allow=(parse_port_spec("udp/443"),)) if e.cgroup == lab.rel("w/ex") else e
        for e in policy.exemptions
    ))
    layer.update_exemptions(narrower)
    run_cases(lab, layer, narrower, [Case("w/ex", "10.77.0.2", 5303), Case("w/ex", "10.77.0.3", 443)])


@requires_bpf
def test_drift_status_and_repair_without_compiling(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    layer.apply(make_policy(lab))
    (egress,), _ = _attached(lab.root)
    fd = os.open(lab.root, os.O_RDONLY | os.O_DIRECTORY)
    pfd = prog_fd_by_id(egress, "test")
    try:
        prog_detach(pfd, fd, ATTACH_EGRESS)
    finally:
        os.close(pfd)
        os.close(fd)
    engaged, detail = layer.status()
    assert not engaged and "egress not attached" in detail
    fresh = BpfLayer(layer.instance, netns=lab.client)  # e.g. the daemon after a restart
    assert fresh.ensure_attached() == ["egress"]
    assert fresh.status()[0]
    assert lab.send("w/app", [{"dst": "10.77.0.2", "port": 6601}]) == [{"ok": 0, "eperm": 1, "mark": 0}]


@requires_bpf
def test_failed_apply_keeps_the_previous_generation(lab: Lab, layers: list[BpfLayer], tmp_path: Path) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    gen = layer.apply(policy).generation
    broken = BpfLayer(layer.instance, kernel_source=str(tmp_path / "no-headers"), netns=lab.client)
    with pytest.raises(BpfError, match="no-headers"):
        broken.apply(policy)
    split = tmp_path / "linux-headers-6.1.0-56-amd64"
    (split / "include/generated").mkdir(parents=True)
    (split / "include/generated/autoconf.h").write_text("")
    with pytest.raises(BpfError, match="Debian's -amd64 half"):
        BpfLayer(layer.instance, kernel_source=str(split), netns=lab.client).apply(policy)
    assert layer.status()[0]
    assert [p.name for p in layer.dir.iterdir() if p.name.startswith("g")] == [f"g{gen}"]
    assert lab.send("w/app", [{"dst": "10.77.0.2", "port": 6701}])[0]["eperm"] == 1


@requires_bpf
def test_counters_survive_reload_and_are_readable_without_bcc(lab: Lab, layers: list[BpfLayer],
                                                             tmp_path: Path) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    lab.send("w/app", [{"dst": "10.77.0.2", "port": 6801, "n": 7}])
    # A rebuilt generation and an in-place update both keep the counters.
    linked = BpfLayer(layer.instance, kernel_source=header_link(tmp_path), netns=lab.client)
    assert linked.apply(policy).compiled
    assert linked.apply(make_policy(lab, ipv6="block")).replacement == "in place"
    lab.send("w/other", [{"dst": "10.77.0.2", "port": 6802, "n": 2}])
    code = ("import json, sys; from ksbpf.linux.bpf.layer import BpfLayer; "
            "c = BpfLayer(sys.argv[1]).counters(); print(json.dumps([c, 'bcc' in sys.modules]))")
    out = subprocess.run([PY, "-c", code, layer.instance], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).parents[2])).stdout
    counters, bcc_loaded = json.loads(out)
    assert not bcc_loaded
    assert sorted(map(tuple, counters)) == sorted([
        ("no_tunnel", cgroup_id(lab.dirs["w/app"]), 7, 7 * 38),
        ("no_tunnel", cgroup_id(lab.dirs["w/other"]), 2, 2 * 38),
    ])


@requires_bpf
def test_map_layouts_match_the_python_side(lab: Lab, layers: list[BpfLayer]) -> None:
    import struct

    layer = new_layer(lab, layers)
    gen = layer.apply(make_policy(lab)).generation
    g = layer.dir / f"g{gen}"
    ep = bpf_render.endpoint_key(4, "udp", 1, ip_address("1.2.3.4"))
    dns = bpf_render.addr_key(ip_address("1.2.3.4"))
    hash_, array, lpm = 1, 2, 11
    # name: (type, key size, value size, max_entries)
    wanted = {
        "ks_active": (array, 4, 4, 1),
        "ks_config": (array, 4, struct.calcsize(bpf_layout.CONFIG_FMT), 2),
        "ks_cgroups": (hash_, len(bpf_render.cgroup_key(1, 1)), struct.calcsize(bpf_layout.CGROUP_FMT), 2 * bpf_layout.MAX_CGROUPS),
        "ks_tunnels": (array, 4, 1, bpf_layout.TUNNEL_INDEX),
        "ks_tunnels_big": (hash_, struct.calcsize(bpf_layout.TUNNEL_KEY_FMT), 1, bpf_layout.MAX_BIG_TUNNELS),
        # A one-endpoint policy gets the smallest endpoint map, two versions of it.
        "ks_endpoints": (hash_, len(bpf_render.tagged(1, ep)), 1, 2 * bpf_layout.MIN_ENDPOINT_TIER),
        "ks_dns": (hash_, len(bpf_render.tagged(1, dns)), 1, 2 * bpf_layout.MAX_DNS),
        "ks_ports": (lpm, len(bpf_render.port_key(2, "udp", 1, 16)), 1, 2 * bpf_layout.MAX_RULES),
        "ks_nets": (lpm, len(bpf_render.net_key(2, ip_network("10.0.0.0/8"))), 1, 2 * bpf_layout.MAX_RULES),
    }
    assert set(wanted) == set(bpf_layout.GEN_MAPS)
    for name, layout in wanted.items():
        with bpf_kernel.BpfMap.pinned(g / name) as m:
            assert (m.info.type, m.info.key_size, m.info.value_size, m.info.max_entries) == layout, name
            if m.info.type == hash_:
                assert m.info.flags & 1, f"{name}: hash maps of policy must not preallocate"  # BPF_F_NO_PREALLOC
    with bpf_kernel.BpfMap.pinned(layer.dir / "drops") as m:
        assert (m.info.key_size, m.info.value_size) == (struct.calcsize(bpf_layout.DROP_KEY_FMT),
                                                          struct.calcsize(bpf_layout.DROP_VAL_FMT))


@requires_bpf
def test_reset_detaches_and_unpins_everything(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    layer.apply(make_policy(lab))
    layer.apply(make_policy(lab))
    layer.reset()
    assert _attached(lab.root) == ([], [])
    assert not layer.dir.exists()
    assert layer.status() == (False, "not loaded")
    assert lab.send("w/app", [{"dst": "10.77.0.2", "port": 6901}]) == [{"ok": 1, "eperm": 0, "mark": 0}]


@requires_bpf
def test_reset_finds_programs_whose_pins_were_deleted(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    layer.apply(make_policy(lab))
    import shutil

    shutil.rmtree(layer.dir)  # someone removed /sys/fs/bpf/ksbpf/<instance>
    assert [len(x) for x in _attached(lab.root)] == [1, 1], "enforcement must not depend on the pins"
    assert lab.send("w/app", [{"dst": "10.77.0.2", "port": 7001}])[0]["eperm"] == 1
    # A new apply finds its orphaned programs by their ks_config and replaces them.
    layer.apply(make_policy(lab))
    assert [len(x) for x in _attached(lab.root)] == [1, 1]
    BpfLayer(layer.instance, netns=lab.client).reset(cgroup=lab.cgroups.rel(lab.root))
    assert _attached(lab.root) == ([], [])


@requires_bpf
def test_instances_do_not_touch_each_other(lab: Lab, layers: list[BpfLayer]) -> None:
    a, b = new_layer(lab, layers), new_layer(lab, layers)
    a.apply(make_policy(lab))
    b.apply(make_policy(lab, attach=lab.rel("w")))
    a.apply(make_policy(lab))
    assert [len(x) for x in _attached(lab.root)] == [1, 1]
    assert [len(x) for x in _attached(lab.dirs["w"])] == [1, 1]
    b.reset()
    assert [len(x) for x in _attached(lab.root)] == [1, 1]
    assert a.status()[0]


# ---------------------------------------------------------------- capacity and in-place updates


def _gen_state(layer: BpfLayer) -> tuple[int, int, dict[str, int]]:
    """(generation, live version, entries per map) as the kernel holds them."""
    gen = layer.dir / f"g{layer.last_apply.generation}"  # type: ignore[union-attr]
    sizes = {}
    for name in ("ks_endpoints", "ks_dns", "ks_cgroups", "ks_ports", "ks_nets"):
        with bpf_kernel.BpfMap.pinned(gen / name) as m:
            sizes[name] = len(m.keys())
    cfg = bpf_generations.Generation(layer.last_apply.generation, gen).config()  # type: ignore[union-attr]
    assert cfg is not None
    return cfg.generation, cfg.version, sizes


def big_policy(lab: Lab, n: int) -> Policy:
    """n endpoints (10.77.0.2, udp ports 20000...) and n exemptions, cgroup many/e<i>
    allowed udp/<30000+i> to 10.77.0.3, plus make_policy's own."""
    exempt = "".join(
        f'\n[[exempt]]\ncgroup = "{lab.rel(f"many/e{i}")}"\nallow = ["udp/{30000 + i}"]\nto = ["10.77.0.3/32"]\n'
        for i in range(n)
    )
    base = make_policy(lab, extra=exempt)
    endpoints = tuple(Endpoint(ip_address("10.77.0.2"), 20000 + i, "udp") for i in range(n))
    return dataclasses.replace(base, tunnel=dataclasses.replace(base.tunnel, endpoints=base.tunnel.endpoints + endpoints))


@requires_bpf
def test_ten_thousand_endpoints_and_exemptions(lab: Lab, layers: list[BpfLayer]) -> None:
    n = 10_000
    for i in range(n):
        lab.dirs[f"many/e{i}"] = lab.cgroups(f"many/e{i}")
    layer = new_layer(lab, layers)
    policy = big_policy(lab, n)
    layer.apply(policy)
    assert layer.status()[0], layer.status()[1]
    _, _, sizes = _gen_state(layer)
    assert sizes["ks_endpoints"] == n + 1 and sizes["ks_cgroups"] == n + 3  # + w/ex, w/svc, w/ep
    run_cases(lab, layer, policy, [
        Case("w/ep", "10.77.0.2", 20000, mark=ENDPOINT_MARK),  # the first endpoint
        Case("w/ep", "10.77.0.2", 20000 + n - 1, mark=ENDPOINT_MARK),  # the last
        Case("w/ep", "10.77.0.2", 20000 + n, mark=ENDPOINT_MARK),  # one past: no_tunnel
        Case("w/app", "10.77.0.2", 25000),  # an endpoint without the mark
        Case("many/e0", "10.77.0.3", 30000),  # the first exemption
        Case("many/e7777", "10.77.0.3", 37777),
        Case("many/e7777", "10.77.0.3", 37778),  # its neighbour's port
        Case("many/e9999", "10.77.0.2", 39999),  # its port, another network
        Case("w/app", "10.77.0.3", 30001),
        Case("w/app", "10.88.0.2", 6001),  # the tunnel
        Case("w/app", "10.88.0.3", 53),
    ])


@requires_bpf
def test_a_policy_beyond_capacity_is_refused_before_anything_changes(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    before = _gen_state(layer)
    egress = _attached(lab.root)
    n = bpf_layout.MAX_ENDPOINTS + 1
    endpoints = tuple(Endpoint(ip_address("10.0.0.0") + i, 51820, "udp") for i in range(n))
    too_big = dataclasses.replace(policy, tunnel=dataclasses.replace(policy.tunnel, endpoints=endpoints))
    with pytest.raises(BpfError, match=rf"tunnel\.endpoints: {n} endpoints, the BPF layer holds at most 65536"):
        layer.apply(too_big)
    dns = tuple(ip_address("10.64.0.0") + i for i in range(bpf_layout.MAX_DNS + 1))
    with pytest.raises(BpfError, match=r"dns\.servers: 257 servers, the BPF layer holds at most 256"):
        layer.apply(dataclasses.replace(policy, dns=dataclasses.replace(policy.dns, servers=dns)))
    assert _gen_state(layer) == before and _attached(lab.root) == egress
    assert layer.status()[0]
    run_cases(lab, layer, policy, [Case("w/app", "10.77.0.2", 7101), Case("w/app", "10.88.0.2", 7102)])


class LoaderRuns:
    """Counts the compiling child processes BpfLayer starts (they still run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = bpf_loader._run_loader

        def counted(*args: object, **kw: object) -> bpf_loader.LoadStats:
            self.count += 1
            return real(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(bpf_loader, "_run_loader", counted)


def recreate_tunnel(lab: Lab) -> None:
    """The VPN client recreates its link: same name, new ifindex."""
    sh("ip", "-n", lab.client, "link", "del", lab.tun)
    veth(lab.client, lab.tun, lab.far, "ft0", ["10.88.0.1/24"], ["10.88.0.2/24"])
    # Netdev chains follow a device by name on some kernels and not on others: rebuild.
    sh("nft", "delete", "table", "netdev", "ksfar", netns=lab.far)
    sh("nft", "-f", "-", netns=lab.far, input=FAR_NFT.format(up="fu0", tun="ft0"))


@requires_bpf
def test_warm_apply_and_one_endpoint_more_do_not_compile(lab: Lab, layers: list[BpfLayer],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runs = LoaderRuns(monkeypatch)
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    first = layer.apply(policy)
    assert first.compiled and runs.count == 1
    progs = _attached(lab.root)
    state = _gen_state(layer)

    # The same policy again, also from a fresh process's layer: nothing compiled, nothing written.
    for again in (layer, BpfLayer(layer.instance, netns=lab.client)):
        stats = again.apply(policy)
        assert (stats.compiled, stats.replacement, stats.changed) == (False, "unchanged", ())
        assert stats.load.compile_s == 0 and stats.generation == first.generation
    assert runs.count == 1 and _attached(lab.root) == progs and _gen_state(layer) == state

    # One endpoint more: written in place, as one new version.
    more = dataclasses.replace(policy, tunnel=dataclasses.replace(
        policy.tunnel, endpoints=(*policy.tunnel.endpoints, Endpoint(ip_address("10.77.0.3"), 51821, "udp"))))
    stats = layer.apply(more)
    assert (stats.compiled, stats.replacement, stats.changed) == (False, "in place", ("endpoints",))
    assert stats.writes == ("endpoints (delta +1 -0)",)
    assert runs.count == 1 and _attached(lab.root) == progs
    gen, version, sizes = _gen_state(layer)
    assert (gen, version) == (state[0], state[1] + 1)
    assert sizes == {**state[2], "ks_endpoints": 2}, "the old version's entries are gone"
    assert layer.status()[0]
    run_cases(lab, layer, more, [
        Case("w/ep", "10.77.0.3", 51821, mark=ENDPOINT_MARK),  # the new endpoint
        Case("w/ep", "10.77.0.2", 51820, mark=ENDPOINT_MARK),
        Case("w/app", "10.77.0.3", 51821),
        Case("w/app", "10.88.0.2", 7201),
    ])

    # Drift repaired in place: a detached program, a recreated tunnel link.
    fd = os.open(lab.root, os.O_RDONLY | os.O_DIRECTORY)
    pfd = prog_fd_by_id(progs[0][0], "test")
    try:
        prog_detach(pfd, fd, ATTACH_EGRESS)
    finally:
        os.close(pfd)
        os.close(fd)
    recreate_tunnel(lab)
    lab.dirs["w/ex/child"].rmdir()
    lab.dirs["w/ex"].rmdir()
    lab.cgroups("w/ex/child")  # a unit restarted: same path, new cgroup id
    stats = layer.apply(more)
    assert (stats.compiled, stats.replacement) == (False, "in place")
    assert set(stats.changed) == {"tunnels", "cgroups", "attached egress"}
    assert runs.count == 1 and _attached(lab.root) == progs
    assert layer.status()[0], layer.status()[1]
    run_cases(lab, layer, more, [Case("w/app", "10.88.0.2", 7202), Case("w/app", "10.77.0.2", 7203),
                                 Case("w/ex/child", "10.77.0.2", 5301), Case("w/ex", "10.77.0.2", 5399)])


FAR_SPORTS_NFT = """
table netdev ksmix {{
  set seen {{ type ipv4_addr . inet_service . inet_service; flags dynamic; size 65535; counter; }}
  chain up {{
    type filter hook ingress device "{up}" priority 1;
    meta protocol ip meta l4proto udp update @seen {{ ip daddr . udp dport . udp sport }}
  }}
}}
"""


def _far_by_sport(lab: Lab) -> Counter[tuple[str, int, int]]:
    out: Counter[tuple[str, int, int]] = Counter()
    r = sh("nft", "-j", "list", "set", "netdev", "ksmix", "seen", netns=lab.far)
    for obj in json.loads(r.stdout)["nftables"]:
        for e in obj.get("set", {}).get("elem", []):
            dst, dport, sport = e["elem"]["val"]["concat"]
            out[(dst, int(dport), int(sport))] += e["elem"]["counter"]["packets"]
    return out


@requires_bpf
def test_alternating_policies_under_traffic_never_judge_by_a_mix(lab: Lab, layers: list[BpfLayer],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy A lets mark A reach endpoint A, policy B mark B reach endpoint B. A packet
    judged by one version's flags and the other's endpoints would let mark B reach A (or
    A reach B): none of those may leave, while tunnel traffic never stops."""
    mark_a, mark_b = 0xA1, 0xB2
    # Thousands of other endpoints make each version's endpoints slow to write.
    fillers = [Endpoint(ip_address("10.200.0.0") + i, 51820, "udp") for i in range(3000)]

    def policy(mark: int, endpoint: Endpoint, dns: str, offset: int) -> Policy:
        p = loads_policy(f"""
[tunnel]
interfaces = ["wg*"]
endpoints = ["{endpoint}"]
endpoint_mark = {mark}
[dns]
servers = ["{dns}"]
[bpf]
cgroup = "{lab.cgroups.rel(lab.root)}"
""")
        return dataclasses.replace(p, tunnel=dataclasses.replace(
            p.tunnel, endpoints=(*p.tunnel.endpoints, *fillers[offset:offset + 2000])))

    ep_a, ep_b = Endpoint(ip_address("10.77.0.2"), 51820, "udp"), Endpoint(ip_address("10.77.0.3"), 51821, "udp")
    pol_a, pol_b = policy(mark_a, ep_a, "10.88.0.2", 0), policy(mark_b, ep_b, "10.88.0.3", 1000)
    flows: list[dict[str, Any]] = [
        {"dst": "10.77.0.2", "port": 51820, "mark": mark_a, "sport": 41001},  # A's own
        {"dst": "10.77.0.3", "port": 51821, "mark": mark_b, "sport": 41002},  # B's own
        {"dst": "10.77.0.2", "port": 51820, "mark": mark_b, "sport": 41003},  # only a mix allows these
        {"dst": "10.77.0.3", "port": 51821, "mark": mark_a, "sport": 41004},
        {"dst": "10.88.0.2", "port": 7301, "mark": 0, "sport": 41005},  # the tunnel
    ]
    sh("nft", "-f", "-", netns=lab.far, input=FAR_SPORTS_NFT.format(up="fu0"))
    runs = LoaderRuns(monkeypatch)
    layer = new_layer(lab, layers)
    layer.apply(pol_a)
    sender = start_stream(lab.client, [Probe(f["dst"], f["port"], mark=f["mark"], sport=f["sport"], payload="x")
                                       for f in flows], cgroup=lab.dirs["w/app"], pause=0.0002, stdout=subprocess.PIPE)
    hows = []
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        for i in range(40):
            hows.append(layer.apply(pol_b if i % 2 == 0 else pol_a).replacement)
            time.sleep(0.01)
    finally:
        sent = stream_counts(sender)  # ends its loop; it prints what it sent
    assert not any(c["other"] for c in sent), sent
    assert hows == ["in place"] * 40 and runs.count == 1
    time.sleep(0.3)
    far = _far_by_sport(lab)
    got = {f["sport"]: sum(n for (_, _, sport), n in far.items() if sport == f["sport"]) for f in flows}
    assert got[41003] == 0 and got[41004] == 0, f"packets allowed only by a mix of two versions left: {got}"
    assert sent[2]["ok"] == 0 and sent[3]["ok"] == 0, sent
    assert got[41001] > 0 and got[41002] > 0, f"each policy's own endpoint traffic flowed: {got}"
    assert got[41001] == sent[0]["ok"] and got[41002] == sent[1]["ok"], (got, sent)
    tunnel = sent[4]
    assert tunnel["eperm"] == 0 and tunnel["ok"] > 1000, tunnel
    assert lab.far_counts()[("tun", "10.88.0.2", "udp", 7301)] == tunnel["ok"]
    assert layer.status()[0]
    # Every version's entries but the live one's are gone.
    assert _gen_state(layer)[2]["ks_endpoints"] == 2001


@requires_bpf
def test_a_changed_attach_cgroup_makes_a_new_generation(lab: Lab, layers: list[BpfLayer],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runs = LoaderRuns(monkeypatch)
    layer = new_layer(lab, layers)
    first = layer.apply(make_policy(lab))
    moved = make_policy(lab, attach=lab.rel("w"))
    stats = layer.apply(moved)
    assert (stats.compiled, stats.replacement, runs.count) == (True, "make-before-break", 2)
    assert stats.generation > first.generation
    assert _attached(lab.root) == ([], [])
    assert [len(x) for x in _attached(lab.dirs["w"])] == [1, 1]
    assert [p.name for p in layer.dir.iterdir() if p.name.startswith("g")] == [f"g{stats.generation}"]
    # Staying there is in place again.
    assert layer.apply(moved).replacement == "unchanged" and runs.count == 2
    assert [len(x) for x in _attached(lab.dirs["w"])] == [1, 1]
    assert layer.status()[0]
    run_cases(lab, layer, moved, [Case("w/app", "10.77.0.2", 7401), Case("w/app", "10.88.0.2", 7402)])


@requires_bpf
def test_deferred_cleanup_keeps_the_new_version_and_runs_before_the_next_write(lab: Lab, layers: list[BpfLayer]) -> None:
    """ksbpfd answers an exempt request before the grace period: the new version is live
    at once, the old one's entries go with finish_cleanup() or the next write."""
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    narrower = policy.with_exemptions(tuple(
        Exemption(e.cgroup, allow=(parse_port_spec("udp/443"),)) if e.cgroup == lab.rel("w/ex") else e
        for e in policy.exemptions
    ))
    _, _, settled = _gen_state(layer)
    layer.update_exemptions(narrower, defer_cleanup=True)
    assert layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP
    run_cases(lab, layer, narrower, [Case("w/ex", "10.77.0.2", 5303), Case("w/ex", "10.77.0.3", 443)])
    _, _, deferred = _gen_state(layer)
    # One entry replaced in place (+ the reserve entry); the old grant's rules still there.
    assert deferred["ks_cgroups"] == settled["ks_cgroups"] + 1
    assert deferred["ks_ports"] == settled["ks_ports"] + 1, "the old rule set's port keys are still there"
    layer.finish_cleanup()
    _, _, after = _gen_state(layer)
    assert after["ks_cgroups"] == deferred["ks_cgroups"] and after["ks_ports"] < settled["ks_ports"]
    layer.finish_cleanup()  # nothing pending: a no-op
    # A deferred write followed by another write: the second runs the first's cleanup first.
    layer.update_exemptions(policy, defer_cleanup=True)
    layer.update_exemptions(narrower)
    assert _gen_state(layer)[2] == after
    run_cases(lab, layer, narrower, [Case("w/ex", "10.77.0.2", 5303), Case("w/ex", "10.77.0.3", 443)])
    # Two exemptions changed at once: a new version, then the old one's entries go.
    both = narrower.with_exemptions(tuple(
        Exemption(e.cgroup, allow=(parse_port_spec("udp/444"),)) for e in narrower.exemptions))
    layer.update_exemptions(both, defer_cleanup=True)
    assert layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.VERSIONED  # type: ignore[comparison-overlap]  # mypy keeps an earlier assert's narrowing across the update
    assert _gen_state(layer)[2]["ks_cgroups"] > after["ks_cgroups"], "both versions' entries until the cleanup"
    layer.finish_cleanup()
    assert _gen_state(layer)[2]["ks_cgroups"] == after["ks_cgroups"]
    run_cases(lab, layer, both, [Case("w/ex", "10.77.0.3", 444), Case("w/svc", "10.77.0.3", 444),
                                 Case("w/svc", "10.77.0.2", 40001, sport=5353)])


# ---------------------------------------------------------------- O(changed) in-place updates


class Writes:
    """Map elements this process writes (BpfMap.written), per map, since the last take()."""

    def __init__(self) -> None:
        self.mark = bpf_kernel.BpfMap.written.copy()

    def take(self) -> dict[str, int]:
        now = bpf_kernel.BpfMap.written.copy()
        out = {k: n for k, n in (now - self.mark).items() if n}
        self.mark = now
        return out


def _many(lab: Lab, n: int) -> Policy:
    for i in range(n):
        lab.dirs[f"many/e{i}"] = lab.cgroups(f"many/e{i}")
    return big_policy(lab, n)


def _tunnel_with(policy: Policy, endpoints: tuple[Endpoint, ...]) -> Policy:
    return dataclasses.replace(policy, tunnel=dataclasses.replace(policy.tunnel, endpoints=endpoints))


@requires_bpf
def test_one_endpoint_of_thousands_is_written_alone_and_drift_is_repaired(lab: Lab, layers: list[BpfLayer]) -> None:
    n = 2000
    layer = new_layer(lab, layers)
    policy = _many(lab, n)
    layer.apply(policy)
    writes = Writes()
    new_ep = Endpoint(ip_address("10.77.0.2"), 20000 + n, "udp")
    more = _tunnel_with(policy, (*policy.tunnel.endpoints, new_ep))
    stats = layer.apply(more)
    assert (stats.replacement, stats.changed, stats.writes) == ("in place", ("endpoints",), ("endpoints (delta +1 -0)",))
    # One endpoint key and the live config slot (bookkeeping only, no flip).
    assert writes.take() == {"ks_endpoints": 1, "ks_config": 1}
    gone = policy.tunnel.endpoints[5]
    fewer = _tunnel_with(more, tuple(e for e in more.tunnel.endpoints if e != gone))
    assert layer.apply(fewer).writes == ("endpoints (delta +0 -1)",)
    assert writes.take() == {"ks_endpoints": 1, "ks_config": 1}
    gen, version, sizes = _gen_state(layer)
    assert sizes["ks_endpoints"] == n + 1, "the live version's keys only"
    assert layer.status()[0]
    run_cases(lab, layer, fewer, [
        Case("w/ep", "10.77.0.2", new_ep.port, mark=ENDPOINT_MARK),  # added: passes
        Case("w/ep", "10.77.0.2", gone.port, mark=ENDPOINT_MARK),  # removed: no_tunnel
        Case("w/ep", "10.77.0.2", 20000, mark=ENDPOINT_MARK),
        Case("w/app", "10.77.0.2", new_ep.port),  # without the mark
    ])

    # Someone deletes a live key by hand: blocked (an allow-list) until the next apply,
    # which compares with what the map holds and puts it back, alone.
    cfg = bpf_generations.Generation(gen, layer.dir / f"g{gen}").config()
    assert cfg is not None and cfg.version == version
    with bpf_kernel.BpfMap.pinned(layer.dir / f"g{gen}" / "ks_endpoints") as m:
        assert m.delete(bpf_render.tagged(cfg.endpoints_tag, bpf_render.endpoint_key(4, "udp", 20000, ip_address("10.77.0.2"))))
    run_cases(lab, layer, _tunnel_with(fewer, tuple(e for e in fewer.tunnel.endpoints if e.port != 20000)),
              [Case("w/ep", "10.77.0.2", 20000, mark=ENDPOINT_MARK)])
    writes.take()
    stats = layer.apply(fewer)
    assert (stats.replacement, stats.writes) == ("in place", ("endpoints (delta +1 -0)",))
    assert writes.take() == {"ks_endpoints": 1, "ks_config": 1}
    run_cases(lab, layer, fewer, [Case("w/ep", "10.77.0.2", 20000, mark=ENDPOINT_MARK)])
    assert layer.apply(fewer).replacement == "unchanged" and not writes.take()


@requires_bpf
def test_exempting_one_cgroup_of_thousands_writes_its_entry_alone(lab: Lab, layers: list[BpfLayer]) -> None:
    n = 2000
    layer = new_layer(lab, layers)
    policy = _many(lab, n)
    layer.apply(policy)
    base = _gen_state(layer)[2]
    lab.dirs["many/new"] = lab.cgroups("many/new")
    new = Exemption(lab.rel("many/new"), allow=(parse_port_spec("udp/31999"),), to=(ip_network("10.77.0.3/32"),))
    exempted = policy.with_exemptions((*policy.exemptions, new))
    writes = Writes()
    resolved = layer.update_exemptions(exempted)
    assert resolved[new.cgroup] == cgroup_id(lab.dirs["many/new"])
    step = layer.last_step
    assert step is not None and (step.path, step.cgroup) == (bpf_plan.StepPath.ONE_CGROUP, resolved[new.cgroup])
    # Its entry and the reserve entry, its one port and one network, the config slot.
    assert writes.take() == {"ks_cgroups": 2, "ks_ports": 1, "ks_nets": 1, "ks_config": 1}
    cases = [Case("many/new", "10.77.0.3", 31999), Case("many/new", "10.77.0.3", 31998),
             Case("many/e7", "10.77.0.3", 30007), Case("many/e7", "10.77.0.3", 31999)]
    run_cases(lab, layer, exempted, cases)

    # A narrower grant for it: one entry again, the old rules after the grace period.
    narrower = exempted.with_exemptions((*policy.exemptions, dataclasses.replace(new, allow=(parse_port_spec("udp/31998"),))))
    layer.update_exemptions(narrower, defer_cleanup=True)
    assert layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP
    assert writes.take() == {"ks_cgroups": 2, "ks_ports": 1, "ks_nets": 1, "ks_config": 1}
    layer.finish_cleanup()
    assert writes.take() == {"ks_ports": 1, "ks_nets": 1}, "exactly the old grant's keys"
    run_cases(lab, layer, narrower, cases)

    # Unexempt: its entry goes; its rules after the grace period.
    layer.update_exemptions(policy)
    assert layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP
    assert writes.take() == {"ks_cgroups": 1, "ks_ports": 1, "ks_nets": 1, "ks_config": 1}
    run_cases(lab, layer, policy, cases)
    assert _gen_state(layer)[2] == {**base, "ks_cgroups": base["ks_cgroups"] + 1}  # + the reserve entry

    # From a fresh process (no memory of the last write): the old rules are found by a sweep.
    BpfLayer(layer.instance, netns=lab.client).update_exemptions(exempted)
    writes.take()
    fresh = BpfLayer(layer.instance, netns=lab.client)
    fresh.update_exemptions(narrower)
    assert fresh.last_step is not None and fresh.last_step.path == bpf_plan.StepPath.ONE_CGROUP
    assert writes.take() == {"ks_cgroups": 2, "ks_ports": 1 + 1, "ks_nets": 1 + 1, "ks_config": 1}
    run_cases(lab, fresh, narrower, cases)
    assert _gen_state(layer)[2] == {**base, "ks_cgroups": base["ks_cgroups"] + 2, "ks_ports": base["ks_ports"] + 1,
                                    "ks_nets": base["ks_nets"] + 1}

    # Two exemptions at once: a versioned write of them all.
    writes.take()
    two = narrower.with_exemptions(tuple(e for e in narrower.exemptions if e.cgroup not in (new.cgroup, lab.rel("many/e7"))))
    fresh.update_exemptions(two)
    assert fresh.last_step is not None and fresh.last_step.path == bpf_plan.StepPath.VERSIONED  # type: ignore[comparison-overlap]  # mypy keeps an earlier assert's narrowing across the update
    assert fresh.last_step.describe() == ("cgroups (versioned)",)
    assert writes.take()["ks_cgroups"] > n
    run_cases(lab, fresh, two, cases)
    assert fresh.status()[0]


class Reads:
    """Whole-map reads and single lookups this process makes (BpfMap.read_whole,
    BpfMap.looked_up), per map, since the last take()."""

    def __init__(self) -> None:
        self.mark = (bpf_kernel.BpfMap.read_whole.copy(), bpf_kernel.BpfMap.looked_up.copy())

    def take(self) -> tuple[dict[str, int], int]:
        """(whole-map reads per map, lookups in all)."""
        whole, looked = bpf_kernel.BpfMap.read_whole.copy(), bpf_kernel.BpfMap.looked_up.copy()
        out = {k: n for k, n in (whole - self.mark[0]).items() if n}
        lookups = sum((looked - self.mark[1]).values())
        self.mark = (whole, looked)
        return out, lookups


@requires_bpf
def test_change_exemptions_of_one_cgroup_of_thousands_reads_and_writes_one_entry(lab: Lab,
                                                                                 layers: list[BpfLayer]) -> None:
    n = 2000
    layer = new_layer(lab, layers)
    policy = merge_exemptions(_many(lab, n), ())  # sorted, as the engine merges them
    layer.apply(policy)
    base = _gen_state(layer)[2]
    lab.dirs["many/new"] = lab.cgroups("many/new")
    new = Exemption(lab.rel("many/new"), allow=(parse_port_spec("udp/31999"),), to=(ip_network("10.77.0.3/32"),))
    exempted = merge_exemptions(policy, (new,))
    writes, reads = Writes(), Reads()
    resolved = layer.change_exemptions(policy, exempted)
    assert resolved == {new.cgroup: cgroup_id(lab.dirs["many/new"])} and layer.last_fallback == ""
    step = layer.last_step
    assert step is not None and (step.path, step.cgroup) == (bpf_plan.StepPath.ONE_CGROUP, resolved[new.cgroup])
    assert writes.take() == {"ks_cgroups": 2, "ks_ports": 1, "ks_nets": 1, "ks_config": 1}
    # No whole-map read: the live slot and config, its entry, the reserve entry.
    whole, lookups = reads.take()
    assert whole == {} and lookups <= 4
    cases = [Case("many/new", "10.77.0.3", 31999), Case("many/new", "10.77.0.3", 31998),
             Case("many/e7", "10.77.0.3", 30007), Case("many/e7", "10.77.0.3", 31999)]
    run_cases(lab, layer, exempted, cases)
    # The bookkeeping is what update_exemptions would leave: the same policy again writes nothing.
    layer.update_exemptions(exempted)
    assert layer.last_step is not None and layer.last_step.changed == () and not writes.take()
    reads.take()

    # A narrower grant: one entry, the old rules after the grace period, off the call (deferred).
    narrower = merge_exemptions(policy, (dataclasses.replace(new, allow=(parse_port_spec("udp/31998"),)),))
    layer.change_exemptions(exempted, narrower, defer_cleanup=True)
    assert layer.last_fallback == "" and layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP
    assert writes.take() == {"ks_cgroups": 2, "ks_ports": 1, "ks_nets": 1, "ks_config": 1}
    assert reads.take()[0] == {}
    layer.finish_cleanup()
    assert writes.take() == {"ks_ports": 1, "ks_nets": 1}, "exactly the old grant's keys"
    assert reads.take()[0] == {}
    run_cases(lab, layer, narrower, cases)

    # Unexempt, deferred as ksbpfd does: its entry goes at once, its rules after finish_cleanup.
    reads.take()  # run_cases read the drop counters
    layer.change_exemptions(narrower, policy, defer_cleanup=True)
    assert layer.last_fallback == "" and layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP
    assert writes.take() == {"ks_cgroups": 1, "ks_config": 1}
    whole, lookups = reads.take()
    assert whole == {} and lookups <= 4
    layer.finish_cleanup()
    assert writes.take() == {"ks_ports": 1, "ks_nets": 1}
    run_cases(lab, layer, policy, cases)
    assert _gen_state(layer)[2] == {**base, "ks_cgroups": base["ks_cgroups"] + 1}  # + the reserve entry
    layer.update_exemptions(policy)
    assert layer.last_step is not None and layer.last_step.changed == () and not writes.take()
    assert layer.status()[0] and layer.engaged()


@requires_bpf
def test_change_exemptions_falls_back_to_a_whole_write_when_unsure(lab: Lab, layers: list[BpfLayer]) -> None:
    n = 2000
    layer = new_layer(lab, layers)
    policy = merge_exemptions(_many(lab, n), ())
    layer.apply(policy)
    lab.dirs["many/new"] = lab.cgroups("many/new")
    new = Exemption(lab.rel("many/new"), allow=(parse_port_spec("udp/31999"),), to=(ip_network("10.77.0.3/32"),))
    exempted = merge_exemptions(policy, (new,))
    cases = [Case("many/new", "10.77.0.3", 31999), Case("many/e7", "10.77.0.3", 30007),
             Case("many/e8", "10.77.0.3", 30008)]

    # The same exemptions again (`ksctl exempt` of a recreated cgroup): all re-resolved.
    layer.change_exemptions(policy, policy.with_exemptions(tuple(policy.exemptions)))
    assert "nothing differs" in layer.last_fallback and layer.last_step is not None and not layer.last_step.changed

    # Two exemptions at once: a versioned write of them all.
    two = merge_exemptions(policy, (new, Exemption(lab.rel("many/e7"), allow=(parse_port_spec("udp/31000"),))))
    layer.change_exemptions(policy, two)
    assert "more than one" in layer.last_fallback
    assert layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.VERSIONED
    run_cases(lab, layer, two, cases)
    # And back to one change: in place again.
    layer.change_exemptions(two, exempted)
    assert layer.last_fallback == "" and layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP  # type: ignore[comparison-overlap]  # mypy keeps an earlier assert's narrowing across the update
    run_cases(lab, layer, exempted, cases)

    # A fresh process (no memory of the last write) writes whole.
    fresh = BpfLayer(layer.instance, netns=lab.client)
    fresh.change_exemptions(exempted, policy)
    assert "no index" in fresh.last_fallback and fresh.last_step is not None
    assert fresh.last_step.path == bpf_plan.StepPath.ONE_CGROUP  # update_exemptions' own one-cgroup path
    run_cases(lab, fresh, policy, cases)

    # Another writer came between: the live version is not ours; written whole, and right.
    layer.change_exemptions(exempted, policy)  # what `layer` believes: `exempted` is live
    assert "live version" in layer.last_fallback
    run_cases(lab, layer, policy, cases)

    # The live entry is not what `before` says (deleted by hand): written whole, repaired.
    layer.change_exemptions(policy, exempted)
    assert layer.last_fallback == ""
    gen = layer.dir / f"g{layer.last_apply.generation}"  # type: ignore[union-attr]
    cfg = bpf_generations.Generation(layer.last_apply.generation, gen).config()  # type: ignore[union-attr]
    assert cfg is not None
    with bpf_kernel.BpfMap.pinned(gen / "ks_cgroups") as m:
        assert m.delete(bpf_render.cgroup_key(cgroup_id(lab.dirs["many/new"]), cfg.cgroups_tag))
    narrower = merge_exemptions(policy, (dataclasses.replace(new, allow=(parse_port_spec("udp/31998"),)),))
    layer.change_exemptions(exempted, narrower)
    assert "not what `before` says" in layer.last_fallback
    run_cases(lab, layer, narrower, [Case("many/new", "10.77.0.3", 31998), *cases])

    # Beyond capacity: refused with update_exemptions' error, nothing written.
    writes = Writes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bpf_render, "MAX_CGROUPS", n + 3)
        with pytest.raises(BpfError, match="exempt and endpoint cgroups"):
            layer.change_exemptions(narrower, merge_exemptions(narrower, (
                Exemption(lab.rel("w/other"), allow=(parse_port_spec("udp/1"),)),)))
    assert not writes.take()
    run_cases(lab, layer, narrower, [Case("many/new", "10.77.0.3", 31998), *cases])


@requires_bpf
def test_engine_exempt_and_unexempt_use_the_one_cgroup_path(lab: Lab, layers: list[BpfLayer], tmp_path: Path) -> None:
    from ksbpf.linux.engine import LinuxEngine

    eng = LinuxEngine(netns=lab.client, state_dir=tmp_path / "state")
    eng.defer_bpf_cleanup = True
    text = policy_toml(lab)
    try:
        eng.up(loads_policy(text), text)
        layer = eng.bpf_layer()
        new = Exemption(lab.rel("w/other"), allow=(parse_port_spec("udp/5302"),), to=(ip_network("10.77.0.2/32"),))
        writes = Writes()
        policy = eng.set_exemption(new)
        assert layer.last_fallback == "" and layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP
        assert writes.take() == {"ks_cgroups": 2, "ks_ports": 1, "ks_nets": 1, "ks_config": 1}
        eng.finish_bpf_cleanup()
        # Through all three layers (so not run_cases, whose counts are BPF's alone).
        mark = expected_mark(lab, policy, "w/other", 0)
        assert mark and lab.send("w/other", [{"dst": "10.77.0.2", "port": 5302, "n": 2},
                                             {"dst": "10.77.0.2", "port": 5303, "n": 2}]) == [
            {"ok": 2, "eperm": 0, "mark": mark}, {"ok": 0, "eperm": 2, "mark": mark}]
        policy = eng.remove_exemption(new.cgroup)
        assert layer.last_fallback == "" and layer.last_step is not None and layer.last_step.path == bpf_plan.StepPath.ONE_CGROUP
        assert writes.take().get("ks_ports") is None, "the old rules go after the reply"
        eng.finish_bpf_cleanup()
        assert writes.take() == {"ks_ports": 1, "ks_nets": 1}
        # Not exempt again: no mark, nothing leaves by the uplink (routing may send it into
        # the tunnel, nftables or BPF drop it).
        before = lab.far_counts()
        (res,) = lab.send("w/other", [{"dst": "10.77.0.2", "port": 5302, "n": 2}])
        assert res["mark"] == 0
        time.sleep(0.2)
        assert (lab.far_counts() - before)[far_key("10.77.0.2", 5302)] == 0
        assert _gen_state(layer)[2]["ks_cgroups"] == 3 + 1  # w/ex, w/svc, w/ep and the reserve entry
    finally:
        eng.down()


def test_a_run_time_exemption_beyond_capacity_is_bad_input_and_changes_nothing(
        lab: Lab, layers: list[BpfLayer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ksctl exempt` past the maps' cgroup capacity is refused as bad input (exit 2), as
    `up` refuses such a policy: the nftables sets are as before and nothing is recorded.
    (The capacity is lowered to what this policy holds; the kernel parts are real.)"""
    from ksbpf.errors import PolicyError
    from ksbpf.linux.engine import LinuxEngine

    eng = LinuxEngine(netns=lab.client, state_dir=tmp_path / "state")
    text = policy_toml(lab)
    try:
        eng.up(loads_policy(text), text)
        held = len({e.cgroup for e in eng.applied_policy().exemptions} | set(eng.applied_policy().tunnel.endpoint_cgroups))
        monkeypatch.setattr(bpf_render, "MAX_CGROUPS", held)
        sets = sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=lab.client).stdout
        new = Exemption(lab.rel("w/other"), allow=(parse_port_spec("udp/5302"),), to=(ip_network("10.77.0.2/32"),))
        with pytest.raises(PolicyError, match="the BPF layer holds at most"):
            eng.set_exemption(new)
        assert sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=lab.client).stdout == sets
        assert eng.exemptions.load() == ()
    finally:
        eng.down()
