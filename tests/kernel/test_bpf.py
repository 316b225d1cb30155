"""The cgroup-bpf layer on the real kernel, alone: no nftables and no policy routing in the
client namespace (which is also "someone flushed the whole ruleset": BPF alone holds).

Topology, all made here:

    client netns                       far netns (counts what arrives, per address/proto/port)
      up0  10.77.0.1 fd77::1  <-veth->  fu0  10.77.0.2 10.77.0.3 fd77::2     (the uplink)
      wgXX 10.88.0.1 fd88::1  <-veth->  ft0  10.88.0.2 10.88.0.3 fd88::2     (named as a tunnel)

Senders run inside cgroups below a test-made cgroup (the attach point) and inside the
client netns. Every case is judged by ksbpf.verdict, the oracle, and the kernel must agree:
allowed packets arrive in the far netns, dropped ones fail with EPERM, never arrive, and
are counted under exactly their reason and cgroup.
"""

from __future__ import annotations

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

import pytest

from ksbpf.errors import BpfError
from ksbpf.linux import bpf as kbpf
from ksbpf.linux.bpf import ATTACH_EGRESS, ATTACH_SOCK_CREATE, BpfLayer, prog_query
from ksbpf.linux.cgroup import cgroup_id
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids
from ksbpf.policy import Exemption, Policy, loads_policy, parse_port_spec
from ksbpf.verdict import Packet, verdict
from tests.kernel.conftest import CgroupFactory, NetnsFactory, run_in, sh, spawn_in, unique

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
    if os.geteuid() == 0 and kbpf.probe_netns_cookie_helper():
        modes.insert(0, "helper")
    return modes


SENDER = textwrap.dedent(
    """
    import json, socket, sys
    out = []
    for s in json.loads(sys.argv[1]):
        v6 = ":" in s["dst"]
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        if s.get("mark"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, s["mark"])
        if s.get("sport"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if v6 else "0.0.0.0", s["sport"]))
        mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        ok = eperm = 0
        for _ in range(s.get("n", 1)):
            try:
                sock.sendto(b"ksbpf-test", (s["dst"], s["port"]))
                ok += 1
            except PermissionError:
                eperm += 1
        out.append({"ok": ok, "eperm": eperm, "mark": mark})
    print(json.dumps(out))
    """
)

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

    def send(self, cgroup: str, sends: list[dict[str, object]], netns: str | None = None) -> list[dict[str, int]]:
        r = run_in([PY, "-c", SENDER, json.dumps(sends)], netns=netns or self.client, cgroup=self.dirs[cgroup])
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

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
    client, far = make_netns("ksbc"), make_netns("ksbf")
    tun = unique("wg")
    sh("ip", "-n", client, "link", "add", "up0", "type", "veth", "peer", "name", "fu0", "netns", far)
    sh("ip", "-n", client, "link", "add", tun, "type", "veth", "peer", "name", "ft0", "netns", far)
    for ns, dev, addrs in (
        (client, "up0", ["10.77.0.1/24", "fd77::1/64"]),
        (client, tun, ["10.88.0.1/24", "fd88::1/64"]),
        (far, "fu0", ["10.77.0.2/24", "10.77.0.3/24", "fd77::2/64"]),
        (far, "ft0", ["10.88.0.2/24", "10.88.0.3/24", "fd88::2/64"]),
    ):
        for a in addrs:
            sh("ip", "-n", ns, "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []))
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("nft", "-f", "-", netns=far, input=FAR_NFT.format(up="fu0", tun="ft0"))
    lab = Lab(client, far, tun, make_cgroup)
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
CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.settimeout(1.5); s.bind((sys.argv[1], 0))
    try:
        s.connect((sys.argv[2], int(sys.argv[3]))); print(s.recv(5).decode())
    except OSError as e:
        print(type(e).__name__)
    """
)


@requires_bpf
@pytest.mark.parametrize("mode", _netns_modes())
def test_other_netns_is_not_judged(lab: Lab, layers: list[BpfLayer], mode: str) -> None:
    """The program sees the cgroup's sockets in every netns; it judges only its own."""
    layer = new_layer(lab, layers, mode)
    layer.apply(make_policy(lab))
    # From the far netns (where fu0/ft0 have other ifindexes), inside the same cgroups.
    res = lab.send("w/app", [{"dst": "10.77.0.1", "port": 6201, "n": 2}], netns=lab.far)
    assert res == [{"ok": 2, "eperm": 0, "mark": 0}]
    res = lab.send("w/ex", [{"dst": "10.77.0.1", "port": 6202}], netns=lab.far)
    assert res == [{"ok": 1, "eperm": 0, "mark": 0}], "exempt marks belong to the target netns only"
    # A TCP server there: its SYN-ACKs leave from a request socket, not a full one.
    server = spawn_in([PY, "-c", SERVER, "6203"], netns=lab.far, cgroup=lab.dirs["w/app"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert sh(PY, "-c", CLIENT, "10.77.0.1", "10.77.0.2", "6203", netns=lab.client).stdout.strip() == "hello"
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

        def connect(src: str, port: int) -> str:
            return sh(PY, "-c", CLIENT, src, "10.77.0.1", str(port), netns=lab.far).stdout.strip()

        assert connect("10.77.0.2", 2222) == "hello"  # granted source
        assert connect("10.77.0.3", 2222) == "TimeoutError"  # the SYN-ACK is dropped
        assert connect("10.77.0.2", 2223) == "TimeoutError"  # a service that is not exempt
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


ICMP_SENDER = textwrap.dedent(
    """
    import json, socket, sys
    out = []
    for dst, icmp_type in json.loads(sys.argv[1]):
        v6 = ":" in dst
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                          socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        # type, code, checksum (the kernel fills it for ICMPv6; 0 is fine for the test on v4)
        msg = bytes([icmp_type, 0, 0, 0]) + bytes(4) + (socket.inet_pton(socket.AF_INET6, dst) if v6 else b"")
        try:
            s.sendto(msg, (dst, 0))
            out.append("ok")
        except PermissionError:
            out.append("eperm")
    print(json.dumps(out))
    """
)


@requires_bpf
def test_icmp_only_neighbour_discovery_leaves_outside_the_tunnel(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    probes = [("fd77::2", 135), ("fd77::2", 136), ("fd77::2", 133), ("fd77::2", 128), ("10.77.0.2", 8),
              ("fd88::2", 128), ("10.88.0.2", 8)]
    r = run_in([PY, "-c", ICMP_SENDER, json.dumps(probes)], netns=lab.client, cgroup=lab.dirs["w/app"])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
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
    code = textwrap.dedent(
        """
        import json, socket, sys, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ok = eperm = 0
        end = time.monotonic() + float(sys.argv[3])
        while time.monotonic() < end:
            try:
                s.sendto(b"x", (sys.argv[1], int(sys.argv[2]))); ok += 1
            except PermissionError:
                eperm += 1
            time.sleep(0.0005)
        print(json.dumps({"ok": ok, "eperm": eperm}), flush=True)
        """
    )
    return [
        spawn_in([PY, "-c", code, dst, str(port), str(seconds)], netns=lab.client, cgroup=lab.dirs["w/app"],
                 stdout=subprocess.PIPE)
        for dst, port in (("10.77.0.2", 6301), ("10.88.0.2", 6302))
    ]


def _attached(cg: Path) -> tuple[list[int], list[int]]:
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return prog_query(fd, ATTACH_EGRESS), prog_query(fd, ATTACH_SOCK_CREATE)
    finally:
        os.close(fd)


@requires_bpf
def test_replacing_under_traffic_leaks_nothing_and_leaves_one_generation(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    before = {(r, c): p for r, c, p, _ in layer.counters()}
    streams = _streams(lab, 6.0)
    hows = []
    try:
        time.sleep(0.3)
        for i in range(3):
            hows.append(layer.apply(policy).replacement)
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
            out, _ = p.communicate(timeout=30)
            results.append(json.loads(out.strip().splitlines()[-1]))
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
    from ksbpf.linux.bpf import BpfLayer
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
    pfd = kbpf._fd_by_id(kbpf._BPF_PROG_GET_FD_BY_ID, egress[0], "test")
    try:
        kbpf.prog_detach(pfd, fd, ATTACH_EGRESS)
    finally:
        os.close(pfd)
        os.close(fd)


@requires_bpf
def test_tunnel_recreated_with_new_ifindex(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    (first,) = layer.update_tunnel_ifindexes()
    sh("ip", "-n", lab.client, "link", "del", lab.tun)
    sh("ip", "-n", lab.client, "link", "add", lab.tun, "type", "veth", "peer", "name", "ft0", "netns", lab.far)
    for ns, dev, addrs in ((lab.client, lab.tun, ["10.88.0.1/24"]), (lab.far, "ft0", ["10.88.0.2/24"])):
        for a in addrs:
            sh("ip", "-n", ns, "addr", "add", a, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    # Netdev chains follow a device by name on some kernels and not on others: rebuild.
    sh("nft", "delete", "table", "netdev", "ksfar", netns=lab.far)
    sh("nft", "-f", "-", netns=lab.far, input=FAR_NFT.format(up="fu0", tun="ft0"))
    # The stale ifindex no longer matches: the new link is blocked until the map follows.
    assert lab.send("w/app", [{"dst": "10.88.0.2", "port": 6501}]) == [{"ok": 0, "eperm": 1, "mark": 0}]
    new = layer.update_tunnel_ifindexes()
    assert len(new) == 1 and first not in new  # ifindexes are allocated cyclically, never reused at once
    run_cases(lab, layer, policy, [Case("w/app", "10.88.0.2", 6502)])


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
    pfd = kbpf._fd_by_id(kbpf._BPF_PROG_GET_FD_BY_ID, egress, "test")
    try:
        kbpf.prog_detach(pfd, fd, ATTACH_EGRESS)
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
def test_counters_survive_reload_and_are_readable_without_bcc(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    policy = make_policy(lab)
    layer.apply(policy)
    lab.send("w/app", [{"dst": "10.77.0.2", "port": 6801, "n": 7}])
    layer.apply(policy)
    lab.send("w/other", [{"dst": "10.77.0.2", "port": 6802, "n": 2}])
    code = ("import json, sys; from ksbpf.linux.bpf import BpfLayer; "
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
    wanted = {
        "ks_config": (4, struct.calcsize(kbpf.CONFIG_FMT)),
        "ks_cgroups": (8, struct.calcsize(kbpf.CGROUP_FMT)),
        "ks_tunnels": (4, 1),
        "ks_endpoints": (len(kbpf.endpoint_key(4, "udp", 1, ip_address("1.2.3.4"))), 1),
        "ks_dns": (len(kbpf.addr_key(ip_address("1.2.3.4"))), 1),
        "ks_ports": (len(kbpf.port_key(2, "udp", 1, 16)), 1),
        "ks_nets": (len(kbpf.net_key(2, ip_network("10.0.0.0/8"))), 1),
    }
    for name, (ks, vs) in wanted.items():
        with kbpf.BpfMap.pinned(g / name) as m:
            assert (m.info.key_size, m.info.value_size) == (ks, vs), name
    with kbpf.BpfMap.pinned(layer.dir / "drops") as m:
        assert (m.info.key_size, m.info.value_size) == (struct.calcsize(kbpf.DROP_KEY_FMT),
                                                          struct.calcsize(kbpf.DROP_VAL_FMT))


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
