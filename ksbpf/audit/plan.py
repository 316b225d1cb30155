"""Pure: which probes `ksctl audit` sends over which interface, each judged by the
policy first (ksbpf.verdict): what the policy allows is listed, not sent."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from ksbpf.policy import Policy

MAX_TARGETS_PER_INTERFACE = 8
PROBE_PORT = 443
DNS_PORT = 53


class ProbeKind(StrEnum):
    """What a probe sends. A str: the worker's job and the JSON report carry the value."""

    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"  # echo request
    DNS = "dns"  # a query over UDP
    DNS_TCP = "dns-tcp"
    RAW = "raw"  # a UDP frame through AF_PACKET, past routing and the IP hooks

    @property
    def connects(self) -> bool:
        """A TCP connect: its answer is the handshake's outcome, seen when the socket is writable."""
        return self in (ProbeKind.TCP, ProbeKind.DNS_TCP)


@dataclass
class Interface:
    name: str
    index: int
    up: bool
    mac: str = ""
    addrs: dict[int, list[str]] = field(default_factory=lambda: {4: [], 6: []})
    targets: dict[str, set[str]] = field(default_factory=dict)  # address -> why
    skipped: int = 0

    def add(self, addr: str, why: str) -> None:
        self.targets.setdefault(addr, set()).add(why)


@dataclass
class Probe:
    id: int
    kind: ProbeKind
    iface: str
    ifindex: int
    family: int
    addr: str
    port: int
    why: str
    expect: str  # the drop reason the policy gives it
    src: str = ""
    src_mac: str = ""

    def __post_init__(self) -> None:
        self.kind = ProbeKind(self.kind)  # from JSON (the worker's job, a report) it is a str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Probe:
        """The probe of a job or report entry (which carries outcome fields too)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        host = f"[{self.addr}]" if self.family == 6 and self.port else self.addr
        what = {ProbeKind.DNS: "dns/udp", ProbeKind.DNS_TCP: "dns/tcp", ProbeKind.RAW: "raw frame"}.get(self.kind, self.kind)
        where = f"{host}:{self.port}" if self.port else host
        return f"{what} {where}"


def policy_says(policy: Policy, kind: ProbeKind, family: int, addr: str, port: int, iface: str, cgroup: str) -> tuple[bool, str]:
    from ksbpf.verdict import Packet, verdict

    """(allowed, the verdict's reason) for a probe of `kind` from `cgroup`, as the policy judges it."""
    proto = {ProbeKind.ICMP: "icmp" if family == 4 else "icmpv6", ProbeKind.TCP: "tcp", ProbeKind.DNS_TCP: "tcp"}.get(kind, "udp")
    v = verdict(policy, Packet(
        direction="out", proto=proto, dst=ipaddress.ip_address(addr), sport=40000, dport=port, oif=iface,
        cgroup=cgroup, icmp_type=(8 if family == 4 else 128) if kind == ProbeKind.ICMP else None,
    ))
    return v.allow, v.reason.value


def plan_probes(policy: Policy, interfaces: list[Interface], cgroup: str) -> tuple[list[Probe], list[dict[str, Any]]]:
    """The probes to send, and those the policy allows (not sent)."""
    probes: list[Probe] = []
    allowed: list[dict[str, Any]] = []
    endpoint_ports = {str(e.address): (e.proto, e.port) for e in policy.tunnel.endpoints}

    def add(kind: ProbeKind, iface: Interface, family: int, addr: str, port: int, why: str) -> None:
        ok, reason = policy_says(policy, kind, family, addr, port, iface.name, cgroup)
        p = Probe(len(probes) + len(allowed), kind, iface.name, iface.index, family, addr, port, why, reason)
        if ok:
            allowed.append({**asdict(p), "reason": reason})
        else:
            probes.append(p)

    for iface in interfaces:
        for addr, whys in sorted(iface.targets.items()):
            fam = ipaddress.ip_address(addr).version
            why = ", ".join(sorted(whys))
            add(ProbeKind.TCP, iface, fam, addr, PROBE_PORT, why)
            add(ProbeKind.UDP, iface, fam, addr, PROBE_PORT, why)
            add(ProbeKind.ICMP, iface, fam, addr, 0, why)
            add(ProbeKind.DNS, iface, fam, addr, DNS_PORT, why)
            add(ProbeKind.DNS_TCP, iface, fam, addr, DNS_PORT, why)
            if addr in endpoint_ports:
                proto, port = endpoint_ports[addr]
                add(ProbeKind.TCP if proto == "tcp" else ProbeKind.UDP, iface, fam, addr, port, "endpoint's own port, without the endpoint mark")
        for fam in (4, 6):
            dsts = [a for a in sorted(iface.targets) if ipaddress.ip_address(a).version == fam]
            if not dsts:
                continue
            ok, reason = policy_says(policy, ProbeKind.UDP, fam, dsts[0], 9, iface.name, cgroup)
            p = Probe(len(probes) + len(allowed), ProbeKind.RAW, iface.name, iface.index, fam, dsts[0], 9, "AF_PACKET, past routing and IP hooks",
                      "raw_egress", src=(iface.addrs[fam] or ["0.0.0.0" if fam == 4 else "::"])[0], src_mac=iface.mac)
            if ok:
                allowed.append({**asdict(p), "reason": reason})
            else:
                probes.append(p)
    return probes, allowed
