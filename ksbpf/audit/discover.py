"""The interfaces `ksctl audit` probes over and the targets the machine itself names
on each: gateways, usable neighbours (up to a bound), the policy's VPN endpoints and
any --target. Read with pyroute2 inside the namespace."""

from __future__ import annotations

import ipaddress
import socket

from ksbpf.audit.plan import MAX_TARGETS_PER_INTERFACE, Interface
from ksbpf.policy import Policy

NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # reachable, stale, delay, probe, permanent


def discover(policy: Policy, targets: list[str]) -> list[Interface]:
    """Non-tunnel interfaces and the targets to probe over each. Called inside the
    namespace."""
    from pyroute2 import IPRoute

    from ksbpf.marks import ROUTE_TABLE
    from ksbpf.verdict import interface_matches

    out: dict[int, Interface] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name == "lo" or interface_matches(name, policy.tunnel.interfaces):
                continue
            out[link["index"]] = Interface(name, link["index"], bool(link["flags"] & 1), link.get_attr("IFLA_ADDRESS") or "")
        for a in ipr.get_addr():
            iface = out.get(a["index"])
            if iface is not None and a.get_attr("IFA_ADDRESS"):
                iface.addrs[4 if a["family"] == socket.AF_INET else 6].append(a.get_attr("IFA_ADDRESS"))
        gateways: list[tuple[int, str]] = []
        for r in ipr.get_routes():
            table = r.get_attr("RTA_TABLE") or r["table"]
            if table in (ROUTE_TABLE, 255):
                continue
            if r.get_attr("RTA_GATEWAY") and r.get_attr("RTA_OIF") in out:
                gateways.append((r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY")))
            for hop in r.get_attr("RTA_MULTIPATH") or []:
                if hop.get_attr("RTA_GATEWAY") and hop["oif"] in out:
                    gateways.append((hop["oif"], hop.get_attr("RTA_GATEWAY")))
        neighbours: list[tuple[int, str]] = []
        for n in ipr.get_neighbours():
            dst = n.get_attr("NDA_DST")
            if dst and n["ifindex"] in out and n["state"] & NUD_USABLE and not ipaddress.ip_address(dst).is_multicast:
                neighbours.append((n["ifindex"], dst))
    for idx, gw in gateways:
        out[idx].add(gw, "gateway")
    for iface in out.values():
        for ep in policy.tunnel.endpoints:
            iface.add(str(ep.address), "endpoint")
        for t in targets:
            iface.add(t, "--target")
    for idx, addr in neighbours:
        iface = out[idx]
        if addr in iface.targets or len(iface.targets) < MAX_TARGETS_PER_INTERFACE:
            iface.add(addr, "neighbour")
        else:
            iface.skipped += 1
    return sorted(out.values(), key=lambda i: i.index)
