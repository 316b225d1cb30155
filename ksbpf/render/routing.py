"""Policy -> the policy-routing plan (ip rules and the ksbpf table). Pure: no I/O.

Everything that is not exempt and not the tunnel client's own traffic is looked up in
ROUTE_TABLE *before* main: a route pushed into main for the physical interface (DHCP
option 121, "TunnelVision") can neither leak traffic nor pull it out of the tunnel.
ROUTE_TABLE holds a default via each tunnel interface present and a blackhole default
behind it, so a vanished tunnel leaves no route out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from ksbpf.marks import EXEMPT_MARK_BASE, EXEMPT_MARK_MASK, ROUTE_TABLE, RULE_PRIORITY_BASE
from ksbpf.policy import Policy
from ksbpf.verdict import DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER

MAIN_TABLE = 254
# rtm_protocol ksbpf stamps on its rules and routes, so `down` removes only its own.
RT_PROTO_KSBPF = 75
BLACKHOLE_METRIC = 0xFFFFFFFF
PRIO_EXEMPT = RULE_PRIORITY_BASE
PRIO_ENDPOINT = RULE_PRIORITY_BASE + 1
PRIO_DHCP = RULE_PRIORITY_BASE + 2
PRIO_LINK_LOCAL = RULE_PRIORITY_BASE + 3
PRIO_LAN = RULE_PRIORITY_BASE + 10
PRIO_TUNNEL = RULE_PRIORITY_BASE + 100


@dataclass(frozen=True, order=True)
class RuleSpec:
    family: int
    priority: int
    table: int
    fwmark: int = 0
    fwmask: int = 0
    dst: str = ""
    dst_len: int = 0
    ip_proto: int = 0
    sport: int = 0
    dport: int = 0

    def describe(self) -> str:
        parts = [f"ip -{self.family} rule pref {self.priority}"]
        if self.fwmark:
            parts.append(f"fwmark {self.fwmark:#x}/{self.fwmask:#x}")
        if self.dst:
            parts.append(f"to {self.dst}/{self.dst_len}")
        if self.ip_proto:
            parts.append(f"ipproto {'udp' if self.ip_proto == 17 else self.ip_proto}")
        if self.sport:
            parts.append(f"sport {self.sport}")
        if self.dport:
            parts.append(f"dport {self.dport}")
        parts.append(f"lookup {'main' if self.table == MAIN_TABLE else self.table}")
        return " ".join(parts)


@dataclass(frozen=True, order=True)
class RouteSpec:
    family: int
    table: int
    metric: int
    blackhole: bool = False
    oif: int = 0
    dev: str = ""

    def describe(self) -> str:
        dst = "default"
        kind = "blackhole " if self.blackhole else ""
        via = f" dev {self.dev}" if self.dev else ""
        return f"ip -{self.family} route {kind}{dst}{via} table {self.table} metric {self.metric}"


@dataclass(frozen=True)
class RoutingPlan:
    rules: tuple[RuleSpec, ...]
    routes: tuple[RouteSpec, ...]

    def describe(self) -> list[str]:
        return [r.describe() for r in self.rules] + [r.describe() for r in self.routes]


def render_routing(policy: Policy, tunnel_links: Mapping[int, str] | None = None) -> RoutingPlan:
    """`tunnel_links` (ifindex -> name) are the tunnel interfaces present now."""
    rules: list[RuleSpec] = []
    for fam in (4, 6):
        # Exempt sockets (marked at creation by the BPF layer) take the physical route.
        rules.append(RuleSpec(fam, PRIO_EXEMPT, MAIN_TABLE, fwmark=EXEMPT_MARK_BASE, fwmask=EXEMPT_MARK_MASK))
        # The tunnel client's own encrypted packets go to the endpoint the physical way.
        rules.append(RuleSpec(fam, PRIO_ENDPOINT, MAIN_TABLE, fwmark=policy.endpoint_mark, fwmask=0xFFFFFFFF))
        client, server = (DHCP4_CLIENT, DHCP4_SERVER) if fam == 4 else (DHCP6_CLIENT, DHCP6_SERVER)
        rules.append(RuleSpec(fam, PRIO_DHCP, MAIN_TABLE, ip_proto=17, sport=client, dport=server))
        for i, net in enumerate(policy.lan_networks(fam)):
            rules.append(RuleSpec(fam, PRIO_LAN + i, MAIN_TABLE, dst=str(net.network_address), dst_len=net.prefixlen))
        rules.append(RuleSpec(fam, PRIO_TUNNEL, ROUTE_TABLE))
    # Neighbour discovery and other link-local IPv6 stay on their link.
    for net in (ipaddress.IPv6Network("fe80::/10"), ipaddress.IPv6Network("ff00::/8")):
        rules.append(RuleSpec(6, PRIO_LINK_LOCAL, MAIN_TABLE, dst=str(net.network_address), dst_len=net.prefixlen))

    routes: list[RouteSpec] = []
    for fam in (4, 6):
        if not (fam == 6 and policy.ipv6.mode == "block"):
            # Metrics from 1: IPv6 silently turns metric 0 into 1024.
            for metric, (ifindex, name) in enumerate(sorted(tunnel_links.items() if tunnel_links else []), start=1):
                routes.append(RouteSpec(fam, ROUTE_TABLE, metric, oif=ifindex, dev=name))
        routes.append(RouteSpec(fam, ROUTE_TABLE, BLACKHOLE_METRIC, blackhole=True))
    return RoutingPlan(tuple(sorted(rules)), tuple(sorted(routes)))
