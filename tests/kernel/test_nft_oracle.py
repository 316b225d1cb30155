"""The nftables layer agrees with the policy evaluator, packet by packet.

Only the nft layer is engaged (no routing, no BPF), so each outbound UDP datagram is
decided by the output chain alone; SO_BINDTODEVICE picks the interface and SO_MARK the
mark. A drop in output comes back to sendto() as EPERM. An exempt mark stands for a
socket of that exemption's cgroup (the BPF layer gives it at socket creation).
"""

from __future__ import annotations

import ipaddress
import itertools

from ksbpf.linux.nftables import NftLayer
from ksbpf.marks import exempt_mark, exemption_ids
from ksbpf.policy import loads_policy
from ksbpf.verdict import Packet, verdict
from tests.kernel.conftest import NetnsFactory, sh
from tests.kernel.sender import Probe, send_all
from tests.kernel.uplink import build_uplink


def test_output_chain_agrees_with_verdict(make_netns: NetnsFactory) -> None:
    u = build_uplink(make_netns)
    text = u.policy(
        "[lan]\nallow = true\nnetworks = ['192.168.7.0/24', 'fd07::/64']\n"
        "[[exempt]]\ncgroup = 'ntp.service'\nallow = ['udp/123']\nto = ['198.51.100.0/24']\n"
        "[[exempt]]\ncgroup = 'sshd.service'\nlisten = ['udp/2222']\nfrom = ['203.0.113.0/24']\n"
    ).replace('["192.0.2.1:51820/udp"]', '["192.0.2.1:51820/udp", "[2001:db8:1::1]:51820/udp"]')
    policy = loads_policy(text)
    # IPv6 does not assume on-link for a bound socket: give it a (low-preference) route.
    sh("ip", "-6", "route", "add", "default", "dev", u.tun_if, "metric", "4000", netns=u.client)
    NftLayer(u.client).apply(policy)
    ids = exemption_ids(["ntp.service", "sshd.service"])
    marks = {0: None, 0xCA6C: None, exempt_mark(ids["ntp.service"]): "ntp.service", exempt_mark(ids["sshd.service"]): "sshd.service"}
    dsts = ["10.64.0.1", "203.0.113.9", "192.0.2.1", "198.51.100.5", "192.168.7.9", "fd00:64::1", "2001:db8:1::1", "fd07::9", "2606:4700::1"]
    ports = [53, 853, 123, 443, 51820]
    devs = [u.tun_if, u.up_if]
    cases = [(d, p, dev, m, 0) for d, p, dev, m in itertools.product(dsts, ports, devs, marks)]
    cases += [(d, 40000, dev, m, 2222) for d, dev, m in itertools.product(["203.0.113.9", "198.51.100.5"], devs, marks)]
    # One datagram per case, each on its own socket, through the shared sender.
    sent = send_all(u.client, [Probe(d, p, dev=dev, mark=m, sport=sp, payload="oracle") for d, p, dev, m, sp in cases])
    got = [bool(r.sent) if r.sent or r.errors == {"EPERM": 1} else f"errors {r.errors}" for r in sent.results]
    mismatches = []
    for (dst, port, dev, mark, sport), allowed in zip(cases, got, strict=True):
        assert isinstance(allowed, bool), f"{dst}:{port} via {dev}: unexpected {allowed}"
        packet = Packet("out", "udp", ipaddress.ip_address(dst), sport=sport or 40000, dport=port, oif=dev, mark=mark, cgroup=marks[mark])
        v = verdict(policy, packet)
        if v.allow != allowed:
            mismatches.append(f"{dst}:{port} dev={dev} mark={mark:#x} sport={sport}: kernel {'allow' if allowed else 'drop'}, oracle {v}")
    assert len(cases) > 300
    assert not mismatches, "\n".join(mismatches)
