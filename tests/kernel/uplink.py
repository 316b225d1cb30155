"""A client namespace with an uplink veth to a far namespace where leaks are counted,
and a plain veth playing the tunnel (for tests that are about rules, not WireGuard)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from dataclasses import dataclass

from tests.kernel.conftest import NetnsFactory, sh, unique


@dataclass
class Uplink:
    client: str
    far: str
    vpn: str
    up_if: str
    far_if: str
    tun_if: str

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
        out = sh("nft", "-j", "list", "counter", "netdev", "leakwatch", "seen", netns=self.far).stdout
        return int(next(o for o in json.loads(out)["nftables"] if "counter" in o)["counter"]["packets"])

    def tunnel_count(self) -> int:
        out = sh("nft", "-j", "list", "counter", "netdev", "leakwatch", "seen", netns=self.vpn).stdout
        return int(next(o for o in json.loads(out)["nftables"] if "counter" in o)["counter"]["packets"])


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


def build_uplink(make_netns: NetnsFactory, tunnel: bool = True) -> Uplink:
    client, far, vpn = make_netns("kc"), make_netns("kf"), make_netns("kv")
    tag = unique("")
    up_if, far_if, tun_if = f"up{tag}", f"fr{tag}", f"wgt{tag}"
    sh("ip", "link", "add", up_if, "netns", client, "type", "veth", "peer", "name", far_if, "netns", far)
    for ns, dev, v4, v6 in ((client, up_if, "192.0.2.2/24", "2001:db8:1::2/64"), (far, far_if, "192.0.2.1/24", "2001:db8:1::1/64")):
        sh("ip", "addr", "add", v4, "dev", dev, netns=ns)
        sh("ip", "-6", "addr", "add", v6, "dev", dev, "nodad", netns=ns)
        sh("ip", "link", "set", dev, "up", netns=ns)
    sh("ip", "route", "add", "default", "via", "192.0.2.1", netns=client)
    sh("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1", netns=client)
    sh("nft", "-f", "-", netns=far, input=WATCH.format(dev=far_if))
    u = Uplink(client, far, vpn, up_if, far_if, tun_if)
    if tunnel:
        add_tunnel(u)
    return u


def add_tunnel(u: Uplink) -> None:
    """A veth named like a tunnel, to a 'vpn' namespace that counts what arrives."""
    peer = "p" + u.tun_if[3:]
    sh("ip", "link", "add", u.tun_if, "netns", u.client, "type", "veth", "peer", "name", peer, "netns", u.vpn)
    sh("ip", "addr", "add", "10.64.0.2/24", "dev", u.tun_if, netns=u.client)
    sh("ip", "-6", "addr", "add", "fd00:64::2/64", "dev", u.tun_if, "nodad", netns=u.client)
    # no ARP, like a real tunnel: frames go to the broadcast MAC and the peer takes them
    sh("ip", "link", "set", u.tun_if, "arp", "off", "up", netns=u.client)
    sh("ip", "addr", "add", "10.64.0.1/24", "dev", peer, netns=u.vpn)
    sh("ip", "-6", "addr", "add", "fd00:64::1/64", "dev", peer, "nodad", netns=u.vpn)
    sh("ip", "link", "set", peer, "up", netns=u.vpn)
    # the vpn side answers for every address, like a VPN server routing to the internet
    sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", netns=u.vpn, check=False)
    sh("nft", "-f", "-", netns=u.vpn, input=WATCH.format(dev=peer))


def ksctl(*args: str, netns: str | None = None, state_dir: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    import sys

    cmd = [sys.executable, "-m", "ksbpf.cli"]
    if netns:
        cmd += ["--netns", netns]
    if state_dir:
        cmd += ["--state-dir", state_dir]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=check, timeout=120)

