"""The shared test world for the macOS and Windows adapters: the policies (with their
macOS and Windows subjects), a generated set of packets, and how a packet of verdict()'s
world looks to PF and to the Windows firewall (interface names, users, services, programs).

Used by tests/integration/test_adapters_agree.py (rendered rules vs verdict()) and the golden tests.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksbpf.policy import Policy, load_policy
from ksbpf.render.pf import tunnel_interfaces
from ksbpf.verdict import Packet, endpoint_authorized, exemption_for
from tests.unit.pfparse import PfPacket
from tests.unit.winparse import WinPacket

GOLDEN = Path(__file__).parent / "golden"
ip = ipaddress.ip_address

# A process that is neither the tunnel client nor exempt still owns a socket.
OTHER_USER = "_someone"
OTHER_PROGRAM = r"C:\Program Files\Other\other.exe"
WG_EXE = r"C:\Program Files\WireGuard\wireguard.exe"  # full-mapped's tunnel client


@dataclass(frozen=True)
class Case:
    """A policy; its macOS and Windows subjects ([tunnel.macos], [exempt.windows], ...) are in it."""

    name: str
    policy: Policy


def _policy(name: str) -> Policy:
    return load_policy(GOLDEN / "policies" / f"{name}.toml")


def cases() -> list[Case]:
    return [Case(name, _policy(name)) for name in ("minimal", "full", "full-mapped", "wildcard", "corners")]


GOLDEN_CASES = ("minimal", "full", "full-mapped", "wildcard")


# ------------------------------------------------------------------ packets


def tunnel_names(policy: Policy) -> list[str]:
    """Interface names the tunnel patterns match, including one a PF glob does not reach."""
    out: list[str] = []
    for pat in policy.tunnel.interfaces:
        out += [pat[:-1] + n for n in ("0", "7", "31", "40")] if pat.endswith("*") else [pat]
    return out


PORT_PAIRS = [  # (local/source, remote/destination) as an outbound packet sees them
    (40000, 53), (40000, 853), (40000, 443), (40000, 80), (40000, 123), (123, 123),
    (40000, 51820), (51820, 51820), (40000, 22), (22, 40000), (22, 53), (53, 40000),
    (68, 67), (40000, 67), (546, 547), (68, 547), (40000, 6000), (40000, 6010), (40000, 6011),
]
ICMP4 = [8, 0, 3]
ICMP6 = [128, 129, 133, 134, 135, 136, 1]


def _hosts(policy: Policy, family: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    hosts: set[Any] = {ip("8.8.8.8") if family == 4 else ip("2001:4860:4860::8888")}
    hosts |= {ip("10.1.2.3") if family == 4 else ip("fd00:99::3")}
    hosts |= {s for s in policy.dns.servers if s.version == family}
    hosts |= {e.address for e in policy.tunnel.endpoints if e.family == family}
    for n in policy.lan.networks:
        if n.version == family:
            hosts |= {n.network_address + 10, n.network_address + 1}
    for ex in policy.exemptions:
        for n in (*ex.to, *ex.from_):
            if n.version == family:
                hosts.add(n.network_address + (1 if n.num_addresses > 1 else 0))
    hosts.add(ip("192.168.1.1") if family == 4 else ip("fd12:3456::1"))
    return sorted(hosts)


def _identities(policy: Policy) -> list[tuple[str | None, int]]:
    """(cgroup, mark) pairs: nobody, the tunnel client, each exemption and a child of one."""
    mark = policy.endpoint_mark
    out: list[tuple[str | None, int]] = [(None, 0), ("", 0), ("system.slice/other.service", 0), ("", mark)]
    out += [(cg, mark) for cg in policy.tunnel.endpoint_cgroups] + [(cg, 0) for cg in policy.tunnel.endpoint_cgroups]
    for ex in policy.exemptions:
        out += [(ex.cgroup, 0), (ex.cgroup + "/child", 0)]
    return list(dict.fromkeys(out))


def port_pairs(policy: Policy) -> list[tuple[int, int]]:
    """PORT_PAIRS plus the policy's own ports: each endpoint's, and the edges of every
    exempted range, from an ephemeral port and from a listening one."""
    pairs = list(PORT_PAIRS)
    for ep in policy.tunnel.endpoints:
        pairs += [(40000, ep.port), (ep.port, 40000), (22, ep.port)]
    for ex in policy.exemptions:
        for spec in (*ex.allow, *ex.listen):
            for port in {spec.first - 1, spec.first, spec.last, spec.last + 1} - {0, 65536}:
                pairs += [(40000, port), (port, 40000)]
    return list(dict.fromkeys(pairs))


def _protos(policy: Policy, family: int) -> Iterator[tuple[str, int, int, int | None]]:
    for proto in ("tcp", "udp"):
        for sport, dport in port_pairs(policy):
            yield proto, sport, dport, None
    icmp = "icmp" if family == 4 else "icmpv6"
    for t in ICMP4 if family == 4 else ICMP6:
        yield icmp, 0, 0, t
    yield "gre", 0, 0, None


LOCAL = {4: ip("192.168.1.10"), 6: ip("fd12:3456::10")}


def packets(policy: Policy) -> Iterator[Packet]:
    ifaces = [*tunnel_names(policy), "en0"]
    idents = _identities(policy)
    for family in (4, 6):
        hosts = _hosts(policy, family)
        loop = ip("127.0.0.1") if family == 4 else ip("::1")
        for (proto, sport, dport, icmp), (cgroup, mark) in itertools.product(list(_protos(policy, family)), idents):
            for iface in ifaces:
                for host in hosts:
                    yield Packet("out", proto, host, None, sport, dport, oif=iface, mark=mark, cgroup=cgroup, icmp_type=icmp)
            yield Packet("out", proto, loop, None, sport, dport, oif="lo", mark=mark, cgroup=cgroup, icmp_type=icmp)
            if mark:
                continue  # marks do not matter inbound
            # inbound: the port pair reversed, the remote host is the source
            for iface in ifaces:
                for host in hosts:
                    yield Packet("in", proto, LOCAL[family], host, dport, sport, iif=iface, cgroup=cgroup, icmp_type=icmp)
                yield Packet("in", proto, LOCAL[family], hosts[0], dport, sport, iif=iface, cgroup=cgroup,
                             icmp_type=icmp, local_on_iif=False)
            yield Packet("in", proto, loop, loop, dport, sport, iif="lo", cgroup=cgroup, icmp_type=icmp)
        for iface, other in itertools.product(ifaces, ifaces):
            for host in hosts:
                yield Packet("forward", "udp", host, LOCAL[family], 40000, 53, oif=iface, iif=other, cgroup=None)
                yield Packet("forward", "tcp", host, LOCAL[family], 40000, 443, oif=iface, iif=other, cgroup=None)


# ------------------------------------------------------------------ the platforms' view


def pf_user(case: Case, p: Packet) -> str | None:
    """The owner of the packet's local socket as PF sees it: the user the policy names for
    the tunnel client or the exemption the socket's cgroup falls under, else someone else."""
    if p.cgroup is None or p.proto not in ("tcp", "udp"):
        return None
    t = case.policy.tunnel
    if p.direction == "out" and t.macos_endpoint_user and endpoint_authorized(case.policy, p):
        return t.macos_endpoint_user
    ex = exemption_for(case.policy, p.cgroup)
    if ex is not None and ex.macos_user is not None:
        return ex.macos_user
    return OTHER_USER


def to_pf(case: Case, p: Packet, ifname: str | None = None) -> PfPacket:
    iface = p.oif if p.direction == "out" else p.iif
    return PfPacket(
        direction=p.direction,
        ifname=ifname or ("lo0" if iface == "lo" else iface),
        af=p.family,
        proto="icmp6" if p.proto == "icmpv6" else p.proto,
        src=p.src,
        dst=p.dst,
        sport=p.sport,
        dport=p.dport,
        icmp_type=p.icmp_type,
        user=pf_user(case, p),
    )


def win_identity(case: Case, p: Packet) -> tuple[str | None, str | None]:
    """(service, program) of the packet's local socket: what the policy names for the tunnel
    client or the socket's exemption; a service runs in a host program nobody named."""
    if p.cgroup is None:
        return None, None
    t = case.policy.tunnel
    if p.direction == "out" and (t.windows_endpoint_service or t.windows_endpoint_program) and endpoint_authorized(case.policy, p):
        return t.windows_endpoint_service, t.windows_endpoint_program or OTHER_PROGRAM
    ex = exemption_for(case.policy, p.cgroup)
    if ex is not None and (ex.windows_service or ex.windows_program):
        return ex.windows_service, ex.windows_program or OTHER_PROGRAM
    return None, OTHER_PROGRAM


def to_win(case: Case, p: Packet) -> WinPacket:
    out = p.direction == "out"
    iface = p.oif if out else p.iif
    remote = p.dst if out else p.src
    assert remote is not None
    service, program = win_identity(case, p)
    return WinPacket(
        direction="Outbound" if out else "Inbound",
        interface=iface,
        proto=p.proto,
        remote=remote,
        local_port=p.sport if out else p.dport,
        remote_port=p.dport if out else p.sport,
        icmp_type=p.icmp_type,
        service=service,
        program=program,
        loopback=iface == "lo",
        arrived_on_own_interface=p.local_on_iif,
    )


def pf_expansion(policy: Policy) -> set[str]:
    return set(tunnel_interfaces(policy.tunnel.interfaces))


# ------------------------------------------------------------------ golden files


def check_golden(platform: str, case: str, files: dict[str, str], unsupported: list[str] | None) -> None:
    """Compare with tests/unit/golden/<platform>/<case>/; KSBPF_UPDATE_GOLDEN=1 rewrites them
    (review the diff by eye before committing it). `unsupported` (what the platform cannot
    do, one line each) is one more file, unsupported.txt; None where nothing can be."""
    import os

    folder = GOLDEN / platform / case
    expected = dict(files)
    if unsupported is not None:
        expected["unsupported.txt"] = "".join(f"{u}\n" for u in unsupported)
    if os.environ.get("KSBPF_UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.name not in expected:
                old.unlink()
        for name, text in expected.items():
            (folder / name).write_text(text, encoding="ascii")
        return
    assert folder.is_dir(), f"no golden files for {platform}/{case}: run with KSBPF_UPDATE_GOLDEN=1 and review them"
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected), f"golden file set of {platform}/{case} changed"
    for name, text in expected.items():
        want = (folder / name).read_text(encoding="ascii")
        assert text == want, f"{platform}/{case}/{name} differs from its golden file (KSBPF_UPDATE_GOLDEN=1 rewrites it)"
