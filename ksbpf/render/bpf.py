"""The pure BPF plan: what a policy means to the BPF maps (BpfPlan), the map keys and
values it packs into, and the capacity check; describe() and to_json() are how `ksctl
render` shows it. No kernel: ksbpf.linux.bpf writes it."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from ksbpf.errors import CapacityError
from ksbpf.linux.bpf.layout import (
    CGROUP_FMT,
    CGROUP_KEY_FMT,
    F_ENDPOINT_CGROUPS,
    F_ENDPOINT_MARK,
    F_IPV6_BLOCK,
    IPPROTO,
    KIND_ALLOW,
    KIND_LISTEN,
    MAX_BIG_TUNNELS,
    MAX_CGROUPS,
    MAX_DNS,
    MAX_ENDPOINTS,
    MAX_RULES,
    MIN_ENDPOINT_TIER,
    NET_PREFIX_BASE,
    PORT_PREFIX_BASE,
    TUNNEL_INDEX,
)
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids
from ksbpf.policy import Exemption, IPNetwork, Policy, PortSpec


@dataclass(frozen=True)
class ExemptionRules:
    cgroup: str
    mark: int
    allow: tuple[PortSpec, ...]
    listen: tuple[PortSpec, ...]
    to: tuple[IPNetwork, ...]  # both families, as Exemption.to_networks gives them
    from_: tuple[IPNetwork, ...]

    @cached_property
    def digest(self) -> int:
        """Of what rule_keys writes for it (ports and networks, not the cgroup or mark), as
        64 bits; the low 32 are kept in its ks_cgroups entry (CgroupEntry.digest)."""
        parts: list[bytes] = []
        for specs, networks in ((self.allow, self.to), (self.listen, self.from_)):
            parts.append(b"".join(struct.pack("<BHH", IPPROTO[s.proto], s.first, s.last) for s in specs))
            parts.append(b"".join(n.network_address.packed + bytes((n.prefixlen,)) for n in networks) if specs else b"")
        data = b"|".join(len(p).to_bytes(4, "little") + p for p in parts)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    @cached_property
    def want(self) -> CgroupWant:
        """What its cgroup is when it is no endpoint cgroup (kept, as the rules are kept)."""
        return CgroupWant(self, self.mark, False)

    @cached_property
    def counts(self) -> tuple[int, int]:
        """(ks_ports keys, ks_nets keys) rule_keys writes for it."""
        ports = nets = 0
        for specs, networks in ((self.allow, self.to), (self.listen, self.from_)):
            if specs:
                ports += sum(len(port_prefixes(s.first, s.last)) for s in specs)
                nets += len(networks)
        return ports, nets


@dataclass(frozen=True)
class BpfPlan:
    """What a policy means to the BPF maps, before cgroup paths become ids and before
    version tags and rule set ids are chosen. Pure."""

    flags: int
    endpoint_mark: int
    tunnel_patterns: tuple[str, ...]
    endpoints: tuple[bytes, ...]  # endpoint_key()s, untagged
    dns: tuple[bytes, ...]  # addr_key()s, untagged
    lan: tuple[IPNetwork, ...]
    exemptions: tuple[ExemptionRules, ...]
    endpoint_cgroups: tuple[str, ...]
    # the mark sock_create gives endpoint cgroups' sockets (0: the VPN client sets its own)
    endpoint_cgroup_mark: int


def _addr16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return addr.packed.ljust(16, b"\0")


def endpoint_key(family: int, proto: str, port: int, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct ks_endpoint_key without its leading tag (see tagged)."""
    return struct.pack("<BB", family, IPPROTO[proto]) + port.to_bytes(2, "big") + _addr16(addr)


def addr_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct ks_addr_key without its leading tag (see tagged)."""
    return struct.pack("<B3x", addr.version) + _addr16(addr)


def tagged(tag: int, key: bytes) -> bytes:
    """An endpoint or DNS key of the policy version with this tag."""
    return struct.pack("<I", tag) + key


def key_tag(key: bytes) -> int:
    return int(struct.unpack_from("<I", key)[0])


def cgroup_key(cgroup_id: int, tag: int) -> bytes:
    """struct ks_cgroup_key: a cgroup id in the policy version with this tag."""
    return struct.pack(CGROUP_KEY_FMT, cgroup_id, tag, 0)


def net_key(scope: int, net: IPNetwork) -> bytes:
    return struct.pack("<IIB", NET_PREFIX_BASE + net.prefixlen, scope, net.version) + _addr16(
        net.network_address
    ) + b"\0" * 3


def port_key(scope: int, proto: str, port: int, prefix: int) -> bytes:
    return struct.pack("<IIB", PORT_PREFIX_BASE + prefix, scope, IPPROTO[proto]) + port.to_bytes(2, "big") + b"\0"


def rule_set_of(lpm_key: bytes) -> int:
    """The rule set id of a ks_ports or ks_nets key."""
    return int(struct.unpack_from("<I", lpm_key, 4)[0]) >> 1


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """An inclusive port range as (port, prefix length) blocks for the LPM trie."""
    out: list[tuple[int, int]] = []
    while first <= last:
        size = first & -first if first else 1 << 16
        while size > last - first + 1:
            size >>= 1
        out.append((first, 17 - size.bit_length()))
        first += size
    return out


def scope(rules: int, kind: int) -> int:
    return (rules << 1) | kind


# Exemption -> its ExemptionRules, by identity, for the exemptions the last render saw:
# ksbpfd re-renders the same Exemption objects on every exempt (its policy snapshot and
# run-time store are cached), so only the new one is built and digested again.
_RENDERED: dict[int, tuple[Exemption, int, ExemptionRules]] = {}


def _render_exemptions(policy: Policy) -> tuple[ExemptionRules, ...]:
    global _RENDERED
    ids = exemption_ids([e.cgroup for e in policy.exemptions])
    memo: dict[int, tuple[Exemption, int, ExemptionRules]] = _RENDERED
    fresh: dict[int, tuple[Exemption, int, ExemptionRules]] = {}
    out: list[ExemptionRules] = []
    for e in policy.exemptions:
        mark = exempt_mark(ids[e.cgroup])
        rules = rules_for(e, mark, memo)
        fresh[id(e)] = (e, mark, rules)
        out.append(rules)
    _RENDERED = fresh
    return tuple(out)


def rules_for(e: Exemption, mark: int,
               memo: Mapping[int, tuple[Exemption, int, ExemptionRules]] | None = None) -> ExemptionRules:
    """One exemption's ExemptionRules with this mark (from the last render's, if it has them)."""
    hit = (_RENDERED if memo is None else memo).get(id(e))
    # The memo holds the Exemption itself, so its id cannot have been reused; it is frozen.
    if hit is not None and hit[0] is e and hit[1] == mark:
        return hit[2]
    return ExemptionRules(
        cgroup=e.cgroup,
        mark=mark,
        allow=e.allow,
        listen=e.listen,
        # Networks only where there are ports for them (rule_keys ignores the others).
        to=e.to_networks(4) + e.to_networks(6) if e.allow else (),
        from_=e.from_networks(4) + e.from_networks(6) if e.listen else (),
    )


def endpoint_cgroup_mark(policy: Policy) -> int:
    """The mark sock_create gives endpoint cgroups' sockets (0: the VPN client sets its own)."""
    t = policy.tunnel
    return DEFAULT_ENDPOINT_MARK if t.endpoint_cgroups and t.endpoint_mark is None else 0


def render(policy: Policy, sets: bool = True) -> BpfPlan:
    """`sets=False` leaves the endpoint and DNS key sets empty (update_exemptions takes
    only exemptions and endpoint cgroups from a policy; LAN still counts for capacity)."""
    t = policy.tunnel
    flags = 0
    if policy.ipv6.mode == "block":
        flags |= F_IPV6_BLOCK
    if t.endpoint_mark is not None:
        flags |= F_ENDPOINT_MARK
    if t.endpoint_cgroups:
        flags |= F_ENDPOINT_CGROUPS
    return BpfPlan(
        flags=flags,
        endpoint_mark=t.endpoint_mark or 0,
        tunnel_patterns=t.interfaces,
        endpoints=tuple(dict.fromkeys(endpoint_key(ep.family, ep.proto, ep.port, ep.address)
                                      for ep in t.endpoints)) if sets else (),
        dns=tuple(dict.fromkeys(addr_key(a) for a in policy.dns.servers)) if sets else (),
        lan=policy.lan_networks(4) + policy.lan_networks(6),
        exemptions=_render_exemptions(policy),
        endpoint_cgroups=t.endpoint_cgroups,
        endpoint_cgroup_mark=endpoint_cgroup_mark(policy),
    )


def rule_keys(rules: ExemptionRules, rule_set: int) -> tuple[list[bytes], list[bytes]]:
    """ks_ports and ks_nets keys of one exemption as rule set `rule_set`."""
    ports: list[bytes] = []
    nets: list[bytes] = []
    for kind, specs, networks in ((KIND_ALLOW, rules.allow, rules.to), (KIND_LISTEN, rules.listen, rules.from_)):
        if not specs:
            continue
        sc = scope(rule_set, kind)
        for spec in specs:
            ports.extend(port_key(sc, spec.proto, p, n) for p, n in port_prefixes(spec.first, spec.last))
        nets.extend(net_key(sc, n) for n in networks)
    return ports, nets


def lan_keys(networks: Iterable[IPNetwork], rule_set: int) -> list[bytes]:
    return [net_key(scope(rule_set, KIND_ALLOW), n) for n in networks]


def key_counts(plan: BpfPlan) -> tuple[int, int, int]:
    """(exempt and endpoint cgroups, ks_ports keys, ks_nets keys with LAN) of a plan."""
    cgroups = len(set(plan.endpoint_cgroups) | {e.cgroup for e in plan.exemptions})
    ports, nets = 0, len(plan.lan)
    for rules in plan.exemptions:
        p, n = rules.counts
        ports += p
        nets += n
    return cgroups, ports, nets


def check_capacity(plan: BpfPlan) -> None:
    """Refuse a policy the maps cannot hold, naming the limit, before anything is touched."""
    check_counts(*key_counts(plan), len(plan.endpoints), len(plan.dns))


def check_counts(cgroups: int, ports: int, nets: int, endpoints: int = 0, dns: int = 0) -> None:
    """check_capacity of counts: exempt and endpoint cgroups, port and network rules
    (LAN included), endpoints, DNS servers."""
    for what, count, unit, limit in (
        ("tunnel.endpoints", endpoints, "endpoints", MAX_ENDPOINTS),
        ("dns.servers", dns, "servers", MAX_DNS),
        ("exempt", cgroups, "exempt and endpoint cgroups", MAX_CGROUPS),
        ("exempt", ports, "port rules (a port range takes one per aligned block)", MAX_RULES),
        ("exempt and lan.networks", nets, "network rules", MAX_RULES),
    ):
        if count > limit:
            raise CapacityError(f"{what}: {count} {unit}, the BPF layer holds at most {limit}")


@dataclass(frozen=True)
class Capacity:
    """How many endpoints one policy version of a build may hold. A hash map allocates its
    buckets for max_entries up front (16 bytes each) even without preallocated elements,
    so the endpoint map grows with the policy in powers of two instead of being 2 MiB for
    one endpoint; every other map is fixed (small, or an LPM trie, which allocates per entry)."""

    endpoints: int = MIN_ENDPOINT_TIER

    @classmethod
    def for_plan(cls, plan: BpfPlan) -> Capacity:
        tier = MIN_ENDPOINT_TIER
        while tier < len(plan.endpoints):
            tier *= 2
        return cls(tier)

    def holds(self, plan: BpfPlan) -> bool:
        return len(plan.endpoints) <= self.endpoints

    def cflags(self) -> list[str]:
        return [
            f"-DKS_MAX_ENDPOINTS={2 * self.endpoints}",
            f"-DKS_MAX_DNS={2 * MAX_DNS}",
            f"-DKS_MAX_CGROUPS={2 * MAX_CGROUPS}",
            f"-DKS_MAX_RULES={2 * MAX_RULES}",
            f"-DKS_TUNNEL_INDEX={TUNNEL_INDEX}",
            f"-DKS_MAX_TUNNELS={MAX_BIG_TUNNELS}",
        ]


@dataclass(frozen=True)
class CgroupEntry:
    """A ks_cgroups value (struct ks_cgroup). `digest` lives in the struct's pad, which the
    programs never read: the low 32 bits of the exemption's ExemptionRules.digest, so that a
    later write can tell which entries a new version changes from the map alone."""

    rules: int = 0
    mark: int = 0
    endpoint: int = 0
    digest: int = 0

    def pack(self) -> bytes:
        return struct.pack(CGROUP_FMT, self.rules, self.mark, self.endpoint, self.digest)

    @classmethod
    def unpack(cls, raw: bytes) -> CgroupEntry:
        r, m, e, d = struct.unpack(CGROUP_FMT, raw)
        return cls(r, m, e, d)


@dataclass(frozen=True)
class CgroupWant:
    """What one cgroup id is in a policy: its exemption (if any), mark, endpoint flag."""

    rules: ExemptionRules | None
    mark: int
    endpoint: bool

    def entry(self, rule_set: int) -> CgroupEntry:
        """Its ks_cgroups value with its exemption as rule set `rule_set`."""
        digest = self.rules.digest & 0xFFFFFFFF if self.rules is not None else 0
        return CgroupEntry(rule_set if self.rules is not None else 0, self.mark, int(self.endpoint), digest)

    @cached_property
    def _tail(self) -> bytes:
        return self.entry(0).pack()[4:]

    @cached_property
    def mix(self) -> int:
        """Of everything but the cgroup id, as 64 bits (see Version.digest)."""
        data = self._tail + (self.rules.digest.to_bytes(8, "little") if self.rules is not None else b"-")
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    def written_as(self, raw: bytes | None) -> bool:
        """Does a packed ks_cgroups value already say this (whatever its rule set id)?"""
        return raw is not None and raw[4:] == self._tail and (raw[:4] != b"\0\0\0\0") == (self.rules is not None)


# ---------------------------------------------------------------- what `ksctl render` shows

_FLAG_NAMES = ((F_IPV6_BLOCK, "ipv6 block"), (F_ENDPOINT_MARK, "endpoint mark"),
               (F_ENDPOINT_CGROUPS, "endpoint cgroups"))
_PROTO_NAMES = {number: name for name, number in IPPROTO.items()}


def _addr_of(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw[:16])


def endpoint_text(key: bytes) -> str:
    """An endpoint_key() as "udp 198.51.100.7:51820" (IPv6 in brackets)."""
    family, proto = key[0], key[1]
    addr = _addr_of(family, key[4:])
    host = str(addr) if family == 4 else f"[{addr}]"
    return f"{_PROTO_NAMES.get(proto, str(proto))} {host}:{int.from_bytes(key[2:4], 'big')}"


def addr_text(key: bytes) -> str:
    """An addr_key() as its address."""
    return str(_addr_of(key[0], key[4:]))


def _ports(specs: tuple[PortSpec, ...]) -> list[str]:
    return [f"{s.proto}/{s.first}" if s.first == s.last else f"{s.proto}/{s.first}-{s.last}" for s in specs]


def to_dict(plan: BpfPlan) -> dict[str, object]:
    """The plan as plain data, its keys decoded: what the BPF maps of one policy version
    hold before cgroup paths become ids and version tags are chosen. `keys` counts what
    check_capacity counts; `limits` are the most one version may hold."""
    exemptions: list[dict[str, object]] = []
    for r in plan.exemptions:
        p, n = r.counts
        exemptions.append({"cgroup": r.cgroup, "mark": f"{r.mark:#x}",
                           "allow": _ports(r.allow), "to": [str(x) for x in r.to],
                           "listen": _ports(r.listen), "from": [str(x) for x in r.from_],
                           "keys": {"ports": p, "nets": n}})
    return {
        "flags": [name for bit, name in _FLAG_NAMES if plan.flags & bit],
        "endpoint_mark": f"{plan.endpoint_mark:#x}",
        "tunnel_interfaces": list(plan.tunnel_patterns),
        "endpoints": [endpoint_text(k) for k in plan.endpoints],
        "dns": [addr_text(k) for k in plan.dns],
        "lan": [str(n) for n in plan.lan],
        "exemptions": exemptions,
        "endpoint_cgroups": list(plan.endpoint_cgroups),
        "endpoint_cgroup_mark": f"{plan.endpoint_cgroup_mark:#x}",
        "keys": dict(zip(("cgroups", "ports", "nets"), key_counts(plan), strict=True)),
        "limits": {"endpoints": MAX_ENDPOINTS, "dns": MAX_DNS, "cgroups": MAX_CGROUPS, "rules": MAX_RULES},
    }


def to_json(plan: BpfPlan) -> str:
    return json.dumps(to_dict(plan), indent=2)


def describe(plan: BpfPlan) -> list[str]:
    """The plan as short lines, as `ksctl render` prints it after the routing plan."""
    flags = [name for bit, name in _FLAG_NAMES if plan.flags & bit]
    lines = [f"flags: {', '.join(flags) or 'none'}"]
    if plan.flags & F_ENDPOINT_MARK:
        lines.append(f"endpoint mark {plan.endpoint_mark:#x}: the VPN client's own packets, to its endpoints")
    lines.append(f"tunnels: links named {', '.join(plan.tunnel_patterns) or '(none)'} (ifindexes when applied)")
    lines += [f"endpoint {endpoint_text(k)}" for k in plan.endpoints]
    lines += [f"dns {addr_text(k)}" for k in plan.dns]
    lines += [f"lan {n}" for n in plan.lan]
    for r in plan.exemptions:
        parts = [f"exempt {r.cgroup} mark {r.mark:#x}"]
        if r.allow:
            parts.append(f"allow {' '.join(_ports(r.allow))} to {' '.join(str(n) for n in r.to)}")
        if r.listen:
            parts.append(f"listen {' '.join(_ports(r.listen))} from {' '.join(str(n) for n in r.from_)}")
        lines.append("; ".join(parts))
    mark = f" (sockets marked {plan.endpoint_cgroup_mark:#x})" if plan.endpoint_cgroup_mark else ""
    lines += [f"endpoint cgroup {c}{mark}" for c in plan.endpoint_cgroups]
    cgroups, ports, nets = key_counts(plan)
    lines.append(f"keys: {cgroups} cgroups, {ports} port rules, {nets} network rules")
    return lines
