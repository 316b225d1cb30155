"""The meaning of a policy, stated once: `verdict(policy, packet) -> Verdict`.

Tests use this as the oracle every backend must agree with; `ksctl explain` prints it.
The order of checks here is the order of rules in every renderer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from ksbpf.policy import Exemption, IPAddress, Policy

DNS_PORTS = (53, 853)
# Router/neighbour solicitation and advertisement: what IPv6 needs to reach a gateway.
ND_ICMPV6_TYPES = (133, 134, 135, 136)
DHCP4_CLIENT, DHCP4_SERVER = 68, 67
DHCP6_CLIENT, DHCP6_SERVER = 546, 547


class Reason(StrEnum):
    """Why a packet is allowed or dropped. Drop reasons name nft counters, BPF map keys
    and the `reason` label of the metrics."""

    LOOPBACK = "loopback"
    TUNNEL = "tunnel"
    ENDPOINT = "endpoint"
    DHCP = "dhcp"
    NEIGHBOUR_DISCOVERY = "neighbour_discovery"
    EXEMPT = "exempt"
    LAN = "lan"
    # drop reasons
    NO_TUNNEL = "no_tunnel"
    DNS = "dns"
    ENDPOINT_UNAUTHORIZED = "endpoint_unauthorized"
    IPV6_BLOCKED = "ipv6_blocked"
    INBOUND = "inbound"
    SPOOFED_LOCAL = "spoofed_local"
    FORWARD = "forward"
    RAW_EGRESS = "raw_egress"


DROP_REASONS: tuple[Reason, ...] = (
    Reason.NO_TUNNEL,
    Reason.DNS,
    Reason.ENDPOINT_UNAUTHORIZED,
    Reason.IPV6_BLOCKED,
    Reason.INBOUND,
    Reason.SPOOFED_LOCAL,
    Reason.FORWARD,
    Reason.RAW_EGRESS,
)


@dataclass(frozen=True)
class Packet:
    """A packet as the policy sees it. `cgroup` is the socket's cgroup path relative to
    the cgroup2 mount ('' is the root; None when no local socket is involved)."""

    direction: Literal["out", "in", "forward"]
    proto: str  # tcp, udp, icmp, icmpv6
    dst: IPAddress
    src: IPAddress | None = None
    sport: int = 0
    dport: int = 0
    oif: str = ""
    iif: str = ""
    mark: int = 0
    cgroup: str | None = ""
    icmp_type: int | None = None
    # inbound: is `dst` an address of the interface it arrived on (CVE-2019-14899)?
    local_on_iif: bool = True

    @property
    def family(self) -> int:
        return self.dst.version


@dataclass(frozen=True)
class Verdict:
    allow: bool
    reason: Reason

    @property
    def action(self) -> str:
        return "allow" if self.allow else "drop"

    def __str__(self) -> str:
        return f"{self.action} ({self.reason.value})"


def _allow(reason: Reason) -> Verdict:
    return Verdict(True, reason)


def _drop(reason: Reason) -> Verdict:
    return Verdict(False, reason)


def interface_matches(name: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p.endswith("*"):
            if name.startswith(p[:-1]):
                return True
        elif name == p:
            return True
    return False


def cgroup_within(cgroup: str, ancestor: str) -> bool:
    """Is `cgroup` the cgroup `ancestor` or one of its descendants?"""
    return cgroup == ancestor or cgroup.startswith(ancestor + "/")


def exemption_for(policy: Policy, cgroup: str | None) -> Exemption | None:
    """The exemption covering `cgroup`; the deepest one wins, as in the BPF lookup."""
    if cgroup is None:
        return None
    best: Exemption | None = None
    for e in policy.exemptions:
        if cgroup_within(cgroup, e.cgroup) and (best is None or len(e.cgroup) > len(best.cgroup)):
            best = e
    return best


def _in_networks(addr: IPAddress | None, nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    return addr is not None and any(addr.version == n.version and addr in n for n in nets)


def _is_dns(p: Packet) -> bool:
    return p.proto in ("tcp", "udp") and p.dport in DNS_PORTS


def _is_nd(p: Packet) -> bool:
    return p.proto == "icmpv6" and p.icmp_type in ND_ICMPV6_TYPES


def _is_dhcp(p: Packet, outbound: bool) -> bool:
    if p.proto != "udp":
        return False
    client, server = (DHCP4_CLIENT, DHCP4_SERVER) if p.family == 4 else (DHCP6_CLIENT, DHCP6_SERVER)
    return (p.sport, p.dport) == ((client, server) if outbound else (server, client))


def endpoint_authorized(policy: Policy, p: Packet) -> bool:
    t = policy.tunnel
    if t.endpoint_mark is not None and p.mark != t.endpoint_mark:
        return False
    if t.endpoint_cgroups:
        return p.cgroup is not None and any(cgroup_within(p.cgroup, c) for c in t.endpoint_cgroups)
    return True


def _tunnel(policy: Policy, p: Packet) -> Verdict:
    if p.family == 6 and policy.ipv6.mode == "block":
        return _drop(Reason.IPV6_BLOCKED)
    # DNS only to the configured resolvers, even inside the tunnel.
    if _is_dns(p) and p.dst not in policy.dns.servers:
        return _drop(Reason.DNS)
    return _allow(Reason.TUNNEL)


def _outbound(policy: Policy, p: Packet) -> Verdict:
    if interface_matches(p.oif, policy.tunnel.interfaces):
        return _tunnel(policy, p)
    if p.oif == "lo":
        return _allow(Reason.LOOPBACK)
    if _is_nd(p):
        return _allow(Reason.NEIGHBOUR_DISCOVERY)
    if _is_dhcp(p, outbound=True):
        return _allow(Reason.DHCP)
    if p.family == 6 and policy.ipv6.mode == "block":
        return _drop(Reason.IPV6_BLOCKED)
    for ep in policy.tunnel.endpoints:
        if ep.address == p.dst and ep.proto == p.proto and ep.port == p.dport:
            if endpoint_authorized(policy, p):
                return _allow(Reason.ENDPOINT)
            return _drop(Reason.ENDPOINT_UNAUTHORIZED)
    ex = exemption_for(policy, p.cgroup)
    if ex is not None:
        if any(s.covers(p.proto, p.dport) for s in ex.allow) and _in_networks(p.dst, ex.to_networks(p.family)):
            return _allow(Reason.EXEMPT)
        if any(s.covers(p.proto, p.sport) for s in ex.listen) and _in_networks(p.dst, ex.from_networks(p.family)):
            return _allow(Reason.EXEMPT)
    # DNS outside the tunnel is dropped before LAN: a LAN resolver is still a leak.
    if _is_dns(p):
        return _drop(Reason.DNS)
    if _in_networks(p.dst, policy.lan_networks(p.family)):
        return _allow(Reason.LAN)
    return _drop(Reason.NO_TUNNEL)


def _inbound(policy: Policy, p: Packet) -> Verdict:
    if interface_matches(p.iif, policy.tunnel.interfaces):
        if p.family == 6 and policy.ipv6.mode == "block":
            return _drop(Reason.IPV6_BLOCKED)
        return _allow(Reason.TUNNEL)
    if p.iif == "lo":
        return _allow(Reason.LOOPBACK)
    # CVE-2019-14899: e.g. the tunnel's address probed from the uplink.
    if not p.local_on_iif:
        return _drop(Reason.SPOOFED_LOCAL)
    if _is_nd(p):
        return _allow(Reason.NEIGHBOUR_DISCOVERY)
    if _is_dhcp(p, outbound=False):
        return _allow(Reason.DHCP)
    if p.family == 6 and policy.ipv6.mode == "block":
        return _drop(Reason.IPV6_BLOCKED)
    for ep in policy.tunnel.endpoints:
        if ep.address == p.src and ep.proto == p.proto and ep.port == p.sport:
            return _allow(Reason.ENDPOINT)
    ex = exemption_for(policy, p.cgroup)
    if ex is not None:
        if any(s.covers(p.proto, p.dport) for s in ex.listen) and _in_networks(p.src, ex.from_networks(p.family)):
            return _allow(Reason.EXEMPT)
        if any(s.covers(p.proto, p.sport) for s in ex.allow) and _in_networks(p.src, ex.to_networks(p.family)):
            return _allow(Reason.EXEMPT)
    if _in_networks(p.src, policy.lan_networks(p.family)):
        return _allow(Reason.LAN)
    return _drop(Reason.INBOUND)


def _forward(policy: Policy, p: Packet) -> Verdict:
    if interface_matches(p.oif, policy.tunnel.interfaces):
        return _tunnel(policy, p)
    if interface_matches(p.iif, policy.tunnel.interfaces):
        if p.family == 6 and policy.ipv6.mode == "block":
            return _drop(Reason.IPV6_BLOCKED)
        return _allow(Reason.TUNNEL)
    if p.family == 6 and policy.ipv6.mode == "block":
        return _drop(Reason.IPV6_BLOCKED)
    if _is_dns(p):
        return _drop(Reason.DNS)
    if _in_networks(p.dst, policy.lan_networks(p.family)):
        return _allow(Reason.LAN)
    return _drop(Reason.FORWARD)


def verdict(policy: Policy, packet: Packet) -> Verdict:
    if packet.direction == "out":
        return _outbound(policy, packet)
    if packet.direction == "in":
        return _inbound(policy, packet)
    return _forward(policy, packet)
