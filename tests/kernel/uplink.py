"""The kernel tests' one topology (for tests about rules, not WireGuard: ksbpf.lab has the
real tunnel): a client namespace with an uplink veth to a far namespace, where what arrives
is counted, and a veth playing the tunnel to a peer (a "vpn" namespace, or the far one).

    client ── up_if <-veth-> far_if ── far     (the uplink; counted on far_if)
           └─ tun_if <-veth-> tun_peer ── vpn  (named as a tunnel; counted on tun_peer)

The addresses and names are a Plan: UPLINK (192.0.2.0/24 to the far side, the tunnel
10.64.0.0/24 to a vpn namespace that answers for every address, default routes via the
uplink) for the nftables, routing, daemon and environment tests; BPF for test_bpf (and the
tests that share its fixture); LOCKDOWN for test_lockdown's server and admin. Namespaces
come from make_netns, so its finalizer removes them with everything in them. Packets are
sent with tests/kernel/sender.py.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from tests.kernel.conftest import NetnsFactory, sh, unique


@dataclass(frozen=True)
class Plan:
    """Names ({tag}: unique per topology) and addresses of one topology."""

    prefixes: tuple[str, str, str] = ("kc", "kf", "kv")  # client, far, vpn namespaces
    up_if: str = "up{tag}"
    far_if: str = "fr{tag}"
    tun_if: str = "wgt{tag}"
    tun_peer: str = "p{tag}"
    client_up: tuple[str, ...] = ("192.0.2.2/24", "2001:db8:1::2/64")
    far_up: tuple[str, ...] = ("192.0.2.1/24", "2001:db8:1::1/64")
    client_tun: tuple[str, ...] = ("10.64.0.2/24", "fd00:64::2/64")
    peer_tun: tuple[str, ...] = ("10.64.0.1/24", "fd00:64::1/64")
    gateways: tuple[str, ...] = ("192.0.2.1", "2001:db8:1::1")  # the client's default routes
    peer_in_far: bool = False  # the tunnel's peer is the far namespace (no vpn namespace)
    # A tunnel has no ARP: frames go to the broadcast MAC and the peer takes them; the vpn
    # side answers for every address, like a VPN server routing to the internet.
    tunnel_like: bool = True
    watch: bool = True  # count what arrives on far_if (and tun_peer)


UPLINK = Plan()
# test_bpf: both links to one far namespace (counted there per device by test_bpf itself),
# fixed device names its rules and counters name, no routes: every destination is on-link.
BPF = Plan(
    prefixes=("ksbc", "ksbf", ""), up_if="up0", far_if="fu0", tun_if="wg{tag}", tun_peer="ft0",
    client_up=("10.77.0.1/24", "fd77::1/64"), far_up=("10.77.0.2/24", "10.77.0.3/24", "fd77::2/64"),
    client_tun=("10.88.0.1/24", "fd88::1/64"), peer_tun=("10.88.0.2/24", "10.88.0.3/24", "fd88::2/64"),
    gateways=(), peer_in_far=True, tunnel_like=False, watch=False,
)
# test_lockdown: the locked-down server is the client here, its admin the far side, which
# has an allowed address (10.9.0.2, fd09::2) and one that is not (10.9.0.3, fd09::3).
LOCKDOWN = Plan(
    prefixes=("kls", "klc", ""), up_if="ls{tag}", far_if="lc{tag}",
    client_up=("10.9.0.1/24", "fd09::1/64"), far_up=("10.9.0.2/24", "10.9.0.3/24", "fd09::2/64", "fd09::3/64"),
    gateways=(), peer_in_far=True,
)


@dataclass
class Uplink:
    client: str
    far: str
    vpn: str
    up_if: str
    far_if: str
    tun_if: str
    tun_peer: str = ""
    plan: Plan = UPLINK

    def policy(self, extra: str = "", interfaces: list[str] | None = None) -> str:
        names = json.dumps(interfaces or [self.tun_if])
        return textwrap.dedent(f"""\
            [tunnel]
            interfaces = {names}
            endpoints = ["192.0.2.1:51820/udp"]
            endpoint_mark = 0xca6c
            [dns]
            servers = ["10.64.0.1"]
            """) + extra

    def far_count(self) -> int:
        """Packets that reached the far side of the uplink (ARP and ND excluded)."""
        return watch_count(self.far)

    def tunnel_count(self) -> int:
        return watch_count(self.vpn)


WATCH = """
table netdev leakwatch {{
  counter seen {{ }}
  chain ingress {{
    type filter hook ingress device "{dev}" priority 0; policy accept;
    meta protocol arp return
    icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report }} return
    counter name "seen"
  }}
}}
"""


def watch(netns: str, dev: str) -> None:
    """Count every packet arriving on `dev` but ARP and neighbour discovery (watch_count)."""
    sh("nft", "-f", "-", netns=netns, input=WATCH.format(dev=dev))


def watch_count(netns: str) -> int:
    out = sh("nft", "-j", "list", "counter", "netdev", "leakwatch", "seen", netns=netns).stdout
    return int(next(o for o in json.loads(out)["nftables"] if "counter" in o)["counter"]["packets"])


def veth(a_ns: str, a_if: str, b_ns: str, b_if: str, a_addrs: Sequence[str] = (), b_addrs: Sequence[str] = (),
         *, a_arp: bool = True) -> None:
    """A veth pair between two namespaces, addressed (IPv6 without DAD) and up."""
    sh("ip", "link", "add", a_if, "netns", a_ns, "type", "veth", "peer", "name", b_if, "netns", b_ns)
    for ns, dev, addrs in ((a_ns, a_if, a_addrs), (b_ns, b_if, b_addrs)):
        for a in addrs:
            sh("ip", "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []), netns=ns)
    sh("ip", "link", "set", a_if, *([] if a_arp else ["arp", "off"]), "up", netns=a_ns)
    sh("ip", "link", "set", b_if, "up", netns=b_ns)


def build_uplink(make_netns: NetnsFactory, tunnel: bool = True, plan: Plan = UPLINK) -> Uplink:
    client, far = make_netns(plan.prefixes[0]), make_netns(plan.prefixes[1])
    vpn = far if plan.peer_in_far else make_netns(plan.prefixes[2])
    tag = unique("")
    up_if, far_if, tun_if, tun_peer = (name.format(tag=tag) for name in (plan.up_if, plan.far_if, plan.tun_if, plan.tun_peer))
    veth(client, up_if, far, far_if, plan.client_up, plan.far_up)
    for gw in plan.gateways:
        sh("ip", *(["-6"] if ":" in gw else []), "route", "add", "default", "via", gw, netns=client)
    if plan.watch:
        watch(far, far_if)
    u = Uplink(client, far, vpn, up_if, far_if, tun_if, tun_peer, plan)
    if tunnel:
        add_tunnel(u)
    return u


def add_tunnel(u: Uplink) -> None:
    """The veth playing the tunnel (again, after a test deleted it: same name, new ifindex)."""
    p = u.plan
    veth(u.client, u.tun_if, u.vpn, u.tun_peer, p.client_tun, p.peer_tun, a_arp=not p.tunnel_like)
    if p.tunnel_like:
        sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", netns=u.vpn, check=False)
    if p.watch:
        watch(u.vpn, u.tun_peer)


def ksctl(*args: str, netns: str | None = None, state_dir: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    import sys

    cmd = [sys.executable, "-m", "ksbpf.cli"]
    if netns:
        cmd += ["--netns", netns]
    if state_dir:
        cmd += ["--state-dir", state_dir]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=check, timeout=120)
