from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ksbpf.policy import load_policy, loads_policy
from ksbpf.verdict import Packet, Reason, verdict

P = load_policy(Path(__file__).parent / "policies" / "full.toml")
A = ipaddress.ip_address
SSH = "system.slice/sshd.service"
NTP = "system.slice/systemd-timesyncd.service"
WG = "system.slice/wg-quick@wg0.service"


def out(dst: str, proto: str = "tcp", dport: int = 443, oif: str = "eth0", **kw: object) -> Packet:
    return Packet("out", proto, A(dst), dport=dport, oif=oif, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("packet", "allow", "reason"),
    [
        (out("1.1.1.1", oif="wg0"), True, Reason.TUNNEL),
        (out("1.1.1.1", oif="tun7"), True, Reason.TUNNEL),
        (out("1.1.1.1"), False, Reason.NO_TUNNEL),
        (out("2606:4700::1111"), False, Reason.NO_TUNNEL),
        (out("2606:4700::1111", oif="wg0"), True, Reason.TUNNEL),
        (out("127.0.0.1", oif="lo"), True, Reason.LOOPBACK),
        (out("10.64.0.1", "udp", 53, oif="wg0"), True, Reason.TUNNEL),
        (out("8.8.8.8", "udp", 53, oif="wg0"), False, Reason.DNS),
        (out("8.8.8.8", "tcp", 853), False, Reason.DNS),
        (out("192.168.1.1", "udp", 53), False, Reason.DNS),
        (out("192.168.1.20", "tcp", 445), True, Reason.LAN),
        (out("198.51.100.7", "udp", 51820, mark=0xCA6C, cgroup=WG), True, Reason.ENDPOINT),
        (out("198.51.100.7", "udp", 51820, mark=0xCA6C, cgroup="user.slice"), False, Reason.ENDPOINT_UNAUTHORIZED),
        (out("198.51.100.7", "udp", 51820, cgroup=WG), False, Reason.ENDPOINT_UNAUTHORIZED),
        (out("198.51.100.7", "tcp", 22, mark=0xCA6C, cgroup=WG), False, Reason.NO_TUNNEL),
        (out("162.159.200.1", "udp", 123, cgroup=NTP), True, Reason.EXEMPT),
        (out("162.159.200.1", "udp", 123, cgroup=NTP + "/child"), True, Reason.EXEMPT),
        (out("162.159.200.2", "udp", 123, cgroup=NTP), False, Reason.NO_TUNNEL),
        (out("162.159.200.1", "udp", 124, cgroup=NTP), False, Reason.NO_TUNNEL),
        (out("162.159.200.1", "udp", 123, cgroup="system.slice/other.service"), False, Reason.NO_TUNNEL),
        (Packet("out", "tcp", A("10.1.2.3"), sport=22, dport=50000, oif="eth0", cgroup=SSH), True, Reason.EXEMPT),
        (Packet("out", "tcp", A("11.1.2.3"), sport=22, dport=50000, oif="eth0", cgroup=SSH), False, Reason.NO_TUNNEL),
        (Packet("out", "udp", A("255.255.255.255"), sport=68, dport=67, oif="eth0"), True, Reason.DHCP),
        (Packet("out", "icmpv6", A("ff02::2"), oif="eth0", icmp_type=133), True, Reason.NEIGHBOUR_DISCOVERY),
        (Packet("in", "tcp", A("192.0.2.2"), src=A("10.9.9.9"), sport=40000, dport=22, iif="eth0", cgroup=SSH), True, Reason.EXEMPT),
        (Packet("in", "tcp", A("192.0.2.2"), src=A("11.9.9.9"), sport=40000, dport=22, iif="eth0", cgroup=SSH), False, Reason.INBOUND),
        (Packet("in", "tcp", A("192.0.2.2"), src=A("10.9.9.9"), sport=40000, dport=23, iif="eth0", cgroup=SSH), False, Reason.INBOUND),
        (Packet("in", "tcp", A("10.64.0.2"), src=A("192.0.2.1"), dport=22, iif="eth0", local_on_iif=False), False, Reason.SPOOFED_LOCAL),
        (Packet("in", "udp", A("192.0.2.2"), src=A("198.51.100.7"), sport=51820, dport=40000, iif="eth0"), True, Reason.ENDPOINT),
        (Packet("in", "tcp", A("10.64.0.2"), src=A("1.1.1.1"), iif="wg0"), True, Reason.TUNNEL),
        (Packet("forward", "tcp", A("1.1.1.1"), dport=443, iif="veth9", oif="eth0"), False, Reason.FORWARD),
        (Packet("forward", "tcp", A("1.1.1.1"), dport=443, iif="veth9", oif="wg0"), True, Reason.TUNNEL),
        (Packet("forward", "udp", A("9.9.9.9"), dport=53, iif="veth9", oif="wg0"), False, Reason.DNS),
    ],
)
def test_full_policy(packet: Packet, allow: bool, reason: Reason) -> None:
    v = verdict(P, packet)
    assert (v.allow, v.reason) == (allow, reason)


def test_ipv6_block_mode_blocks_ipv6_even_in_the_tunnel_but_keeps_nd() -> None:
    p = loads_policy('[tunnel]\ninterfaces = ["wg0"]\n[ipv6]\nmode = "block"\n')
    assert verdict(p, out("2606:4700::1111", oif="wg0")).reason is Reason.IPV6_BLOCKED
    assert verdict(p, out("2606:4700::1111")).reason is Reason.IPV6_BLOCKED
    assert verdict(p, Packet("out", "icmpv6", A("fe80::1"), oif="eth0", icmp_type=135)).allow
    assert verdict(p, out("1.1.1.1", oif="wg0")).allow


def test_lan_is_off_by_default() -> None:
    p = loads_policy('[tunnel]\ninterfaces = ["wg0"]\n[lan]\nnetworks = ["192.168.1.0/24"]\n')
    assert verdict(p, out("192.168.1.20")).reason is Reason.NO_TUNNEL


def test_endpoint_with_cgroups_only() -> None:
    p = loads_policy('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["192.0.2.1:51820/udp"]\nendpoint_cgroups = ["vpn.slice"]\n')
    assert verdict(p, out("192.0.2.1", "udp", 51820, cgroup="vpn.slice/x")).allow
    assert not verdict(p, out("192.0.2.1", "udp", 51820, cgroup="user.slice")).allow
