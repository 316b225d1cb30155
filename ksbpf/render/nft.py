"""Policy -> one nftables JSON batch (libnftables JSON API). Pure: no I/O.

The batch replaces `table inet ksbpf` and `table netdev ksbpf` atomically: add (so the
delete cannot fail with ENOENT), delete, then re-create everything. Packets see either
the old ruleset or the new one, never none.

Rule order follows `ksbpf.verdict`; the cheapest, most common accept (the tunnel) is first.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ksbpf.marks import EXEMPT_MARK_BASE, EXEMPT_MARK_MASK, exempt_mark, exemption_ids
from ksbpf.policy import Endpoint, Exemption, IPNetwork, Policy, PortSpec
from ksbpf.verdict import (
    DHCP4_CLIENT,
    DHCP4_SERVER,
    DHCP6_CLIENT,
    DHCP6_SERVER,
    DNS_PORTS,
    DROP_REASONS,
    ND_ICMPV6_TYPES,
    Reason,
)

TABLE = "ksbpf"
INET = "inet"
NETDEV = "netdev"
Json = dict[str, Any]
ND_TYPE_NAMES = {133: "nd-router-solicit", 134: "nd-router-advert", 135: "nd-neighbor-solicit", 136: "nd-neighbor-advert"}
FAMILIES = {4: ("ip", "ipv4", "ipv4_addr"), 6: ("ip6", "ipv6", "ipv6_addr")}


def counter_name(reason: Reason, family: int) -> str:
    """Named counter per drop reason and address family: `drop_dns_ip4`."""
    return f"drop_{reason.value}_ip{family}"


def counter_names() -> list[tuple[str, Reason, int]]:
    return [(counter_name(r, f), r, f) for r in DROP_REASONS for f in (4, 6)]


# ------------------------------------------------------------------ expression helpers


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(proto: str, field: str) -> Json:
    return {"payload": {"protocol": proto, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _set(values: Iterable[Any]) -> Json:
    return {"set": list(values)}


def _counter(name: str) -> Json:
    return {"counter": name}


ACCEPT: Json = {"accept": None}
DROP: Json = {"drop": None}


def _jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


def _dns_match() -> list[Json]:
    return [
        _match(_meta("l4proto"), _set(["tcp", "udp"])),
        _match(_payload("th", "dport"), _set(DNS_PORTS)),
    ]


def _nfproto(family: int) -> Json:
    return _match(_meta("nfproto"), FAMILIES[family][1])


def _drop_counted(reason: Reason, family: int, *matches: Json) -> Json:
    return {"expr": [_nfproto(family), *matches, _counter(counter_name(reason, family)), DROP]}


def _ifname_matches(key: str, pattern: str) -> Json:
    # nft matches a trailing '*' in an interface name string as a prefix wildcard.
    return _match(_meta(key), pattern)


# ------------------------------------------------------------------ set elements


def _net(n: IPNetwork) -> Any:
    if n.prefixlen == n.max_prefixlen:
        return str(n.network_address)
    return {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}


def _ports(p: PortSpec) -> Any:
    return p.first if p.first == p.last else {"range": [p.first, p.last]}


def _merge_ports(specs: Iterable[PortSpec]) -> list[PortSpec]:
    """Merge overlapping or adjacent ranges per protocol: interval sets refuse overlaps."""
    out: list[PortSpec] = []
    for spec in sorted(specs):
        if out and out[-1].proto == spec.proto and spec.first <= out[-1].last + 1:
            last = out[-1]
            out[-1] = PortSpec(last.proto, last.first, max(last.last, spec.last))
        else:
            out.append(spec)
    return out


def _collapse(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    items = tuple(nets)
    if len(items) <= 1:
        return list(items)  # nothing to merge; collapse_addresses is slow at n=10,000
    v4 = [n for n in items if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in items if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def exempt_elements(ex: Exemption, mark: int, family: int, kind: str) -> list[Json]:
    """Elements `mark . network . proto . ports` for one exemption's allow or listen grant."""
    specs = ex.allow if kind == "allow" else ex.listen
    if not specs:
        return []  # most grants have no listen ports: building 0/0 networks for them dominated render
    nets = ex.to_networks(family) if kind == "allow" else ex.from_networks(family)
    return [
        {"concat": [mark, _net(n), p.proto, _ports(p)]}
        for p in _merge_ports(specs)
        for n in _collapse(nets)
    ]


# ------------------------------------------------------------------ the ruleset


class _Builder:
    def __init__(self, policy: Policy, family: str) -> None:
        self.policy = policy
        self.family = family
        self.cmds: list[Json] = []

    def table(self) -> Json:
        return {"family": self.family, "name": TABLE}

    def add(self, kind: str, body: Json) -> None:
        self.cmds.append({"add": {kind: {"family": self.family, "table": TABLE, **body}}})

    def chain(self, name: str, hook: str | None = None, prio: int = 0, dev: str | None = None, policy: str = "drop") -> None:
        body: Json = {"name": name}
        if hook:
            body.update({"type": "filter", "hook": hook, "prio": prio, "policy": policy})
            if dev is not None:
                body["dev"] = dev
        self.add("chain", body)

    def rule(self, chain: str, expr: list[Json], comment: str | None = None) -> None:
        body: Json = {"chain": chain, "expr": expr}
        if comment:
            body["comment"] = comment
        self.add("rule", body)

    def set(self, name: str, typ: str | list[str], elements: list[Any], interval: bool = False) -> None:
        body: Json = {"name": name, "type": typ}
        if interval:
            body["flags"] = ["interval"]
        if elements:
            body["elem"] = elements
        self.add("set", body)

    def counters(self, seeds: Mapping[str, tuple[int, int]]) -> None:
        for name, _, _ in counter_names():
            packets, nbytes = seeds.get(name, (0, 0))
            self.add("counter", {"name": name, "packets": packets, "bytes": nbytes})

    def shared_sets(self, sets: list[SetSpec]) -> None:
        for name, typ, elems, interval in sets:
            self.set(name, typ, elems, interval)


# (name, type, elements, interval)
SetSpec = tuple[str, "str | list[str]", list[Any], bool]


def _endpoint_element(e: Endpoint) -> Json:
    return {"concat": [str(e.address), e.proto, e.port]}


def shared_sets(p: Policy, elements: bool = True) -> list[SetSpec]:
    """Everything that grows lives in sets: a packet costs the same with 1 or 10,000
    endpoints or exemptions, and an exemption is a set update, not a new rule. Both
    tables hold the same sets; built once for both. Without `elements`: the sets empty
    (the ruleset's skeleton, see render_set_changes)."""
    ids = exemption_ids([e.cgroup for e in p.exemptions]) if elements else {}
    out: list[SetSpec] = []
    for fam in (4, 6):
        addr_t = FAMILIES[fam][2]
        out.append((
            f"endpoints{fam}",
            [addr_t, "inet_proto", "inet_service"],
            [_endpoint_element(e) for e in sorted(p.endpoints(fam))] if elements else [],
            False,
        ))
        for kind in ("allow", "listen"):
            elems = [
                el
                for ex in p.exemptions
                for el in exempt_elements(ex, exempt_mark(ids[ex.cgroup]), fam, kind)
            ] if elements else []
            out.append((f"exempt_{kind}{fam}", ["mark", addr_t, "inet_proto", "inet_service"], elems, True))
        out.append((f"lan{fam}", addr_t, [_net(n) for n in _collapse(p.lan_networks(fam))] if elements else [], True))
    return out


def _exempt_rules(b: _Builder, chain: str, mark_key: Json, inbound: bool) -> None:
    """Exempt sockets carry EXEMPT_MARK_BASE|id (given at socket creation by the BPF layer);
    the set holds exactly what that exemption was granted."""
    b.chain(chain)
    for fam in (4, 6):
        ip = FAMILIES[fam][0]
        peer = _payload(ip, "saddr" if inbound else "daddr")
        # allow = remote port; listen = our port (dport inbound, sport on the way out).
        for kind, port_field in (("allow", "sport" if inbound else "dport"), ("listen", "dport" if inbound else "sport")):
            key = {"concat": [mark_key, peer, _meta("l4proto"), _payload("th", port_field)]}
            b.rule(chain, [_nfproto(fam), _match(key, f"@exempt_{kind}{fam}"), ACCEPT])


def _mark_in_exempt_range(mark_key: Json) -> Json:
    return _match({"&": [mark_key, EXEMPT_MARK_MASK]}, EXEMPT_MARK_BASE)


def _tcp_minisock_chain(b: _Builder, name: str, action: Json) -> None:
    """The handshake's last ACK finds a SYN_RECV request sock and a closing peer's FIN a
    TIME_WAIT sock; neither has a readable `socket mark` (the rule breaks). Such a sock is
    found by the packet's full 4-tuple and exists only for a flow the input chain admitted:
    its SYN passed exempt_in, the LAN rule or the tunnel, and a packet for the tunnel's
    address arriving elsewhere is dropped before (the CVE-2019-14899 rule)."""
    b.chain(name)
    # A full socket answers `socket mark`: it is judged by its own mark.
    b.rule(name, [_match({"socket": {"key": "mark"}}, 0, ">="), {"return": None}])
    b.rule(name, [action])


def _tunnel_chain(b: _Builder) -> None:
    """Checks for traffic leaving through the tunnel (output and forward)."""
    p = b.policy
    b.chain("tunnel_out")
    if p.ipv6.mode == "block":
        b.rule("tunnel_out", _drop_counted(Reason.IPV6_BLOCKED, 6)["expr"])
    # DNS only to the configured resolvers, even inside the tunnel.
    for fam in (4, 6):
        ip = FAMILIES[fam][0]
        servers = [str(s) for s in p.dns_servers(fam)]
        not_a_server = [_match(_payload(ip, "daddr"), _set(servers), "!=")] if servers else []
        b.rule("tunnel_out", _drop_counted(Reason.DNS, fam, *_dns_match(), *not_a_server)["expr"])
    b.rule("tunnel_out", [ACCEPT])


def _tunnel_fast_path(b: _Builder, chain: str, key: str) -> None:
    """One rule per tunnel pattern accepts the common case (not DNS) at once; the rest
    goes through tunnel_out. `th dport` reads garbage for ICMP, which at worst sends the
    packet down the full check."""
    p = b.policy
    for pattern in p.tunnel.interfaces:
        # One compare per DNS port, not an anonymous set: two 16-bit compares cost less
        # than a set lookup on the path every tunnel packet takes.
        fast = [_ifname_matches(key, pattern), *(_match(_payload("th", "dport"), port, "!=") for port in DNS_PORTS)]
        if p.ipv6.mode == "block":
            fast.insert(1, _nfproto(4))
        b.rule(chain, [*fast, ACCEPT])
        b.rule(chain, [_ifname_matches(key, pattern), _jump("tunnel_out")])


def _family(b: _Builder, fam: int) -> Json:
    if b.family == NETDEV:
        return _match(_meta("protocol"), FAMILIES[fam][0])
    return _nfproto(fam)


def _nd_and_dhcp(b: _Builder, chain: str, outbound: bool) -> None:
    nd = _match(_payload("icmpv6", "type"), _set(ND_TYPE_NAMES[t] for t in ND_ICMPV6_TYPES))
    b.rule(chain, [_family(b, 6), nd, ACCEPT])
    for fam, client, server in ((4, DHCP4_CLIENT, DHCP4_SERVER), (6, DHCP6_CLIENT, DHCP6_SERVER)):
        sport, dport = (client, server) if outbound else (server, client)
        b.rule(chain, [_family(b, fam), _match(_payload("udp", "sport"), sport), _match(_payload("udp", "dport"), dport), ACCEPT])


def _endpoint_key(fam: int, outbound: bool) -> Json:
    ip = FAMILIES[fam][0]
    return {"concat": [
        _payload(ip, "daddr" if outbound else "saddr"),
        _meta("l4proto"),
        _payload("th", "dport" if outbound else "sport"),
    ]}


def _prerouting(b: _Builder) -> None:
    """Give packets for exempt sockets, and replies from the endpoints, a mark that routes
    the physical way. With src_valid_mark=1 (set by the routing layer, as wg-quick does)
    the reverse-path check then looks them up in main instead of in the ksbpf table, whose
    blackhole makes rp_filter (1 or 2, systemd's default) drop them while the tunnel is
    down. The mark only steers that lookup: exempt_in matches the socket's own mark."""
    b.chain("prerouting", hook="prerouting", prio=-150, policy="accept")
    for pattern in b.policy.tunnel.interfaces:
        b.rule("prerouting", [_ifname_matches("iifname", pattern), ACCEPT])
    # A constant: nft 1.0.6's JSON parser refuses `socket mark` as a statement value,
    # and any mark in the exempt range takes the exempt routing rule.
    mark_physical = {"mangle": {"key": _meta("mark"), "value": EXEMPT_MARK_BASE}}
    b.rule("prerouting", [
        _match(_meta("l4proto"), _set(["tcp", "udp"])), _mark_in_exempt_range({"socket": {"key": "mark"}}), mark_physical,
    ])
    _tcp_minisock_chain(b, "prerouting_minisock", mark_physical)
    b.rule("prerouting", [_match(_meta("l4proto"), "tcp"), _match({"socket": {"key": "transparent"}}, 0), _jump("prerouting_minisock")])
    for fam in (4, 6):
        b.rule("prerouting", [
            _nfproto(fam), _match(_endpoint_key(fam, outbound=False), f"@endpoints{fam}"),
            {"mangle": {"key": _meta("mark"), "value": b.policy.endpoint_mark}},
        ])


def _inet(policy: Policy, counter_seeds: Mapping[str, tuple[int, int]], sets: list[SetSpec]) -> list[Json]:
    b = _Builder(policy, INET)
    b.counters(counter_seeds)
    b.shared_sets(sets)
    b.chain("output", hook="output")
    b.chain("input", hook="input")
    b.chain("forward", hook="forward")
    _prerouting(b)
    _tunnel_chain(b)
    _exempt_rules(b, "exempt_out", _meta("mark"), inbound=False)
    _exempt_rules(b, "exempt_in", {"socket": {"key": "mark"}}, inbound=True)
    _tcp_minisock_chain(b, "input_minisock", ACCEPT)

    # ---- output
    _tunnel_fast_path(b, "output", "oifname")
    b.rule("output", [_match(_meta("oifname"), "lo"), ACCEPT])
    _nd_and_dhcp(b, "output", outbound=True)
    if policy.ipv6.mode == "block":
        b.rule("output", _drop_counted(Reason.IPV6_BLOCKED, 6)["expr"])
    for fam in (4, 6):
        # The endpoint's cgroup half of the check is the BPF layer's.
        key = _endpoint_key(fam, outbound=True)
        b.rule("output", [_nfproto(fam), _match(_meta("mark"), policy.endpoint_mark), _match(key, f"@endpoints{fam}"), ACCEPT])
        b.rule("output", _drop_counted(Reason.ENDPOINT_UNAUTHORIZED, fam, _match(key, f"@endpoints{fam}"))["expr"])
    b.rule("output", [_mark_in_exempt_range(_meta("mark")), _jump("exempt_out")])
    # DNS outside the tunnel is dropped before LAN: a LAN resolver is still a leak.
    for fam in (4, 6):
        b.rule("output", _drop_counted(Reason.DNS, fam, *_dns_match())["expr"])
    if policy.lan.allow:
        for fam in (4, 6):
            b.rule("output", [_nfproto(fam), _match(_payload(FAMILIES[fam][0], "daddr"), f"@lan{fam}"), ACCEPT])
    for fam in (4, 6):
        b.rule("output", _drop_counted(Reason.NO_TUNNEL, fam)["expr"])

    # ---- input
    for pattern in policy.tunnel.interfaces:
        if policy.ipv6.mode == "block":
            b.rule("input", _drop_counted(Reason.IPV6_BLOCKED, 6, _ifname_matches("iifname", pattern))["expr"])
        b.rule("input", [_ifname_matches("iifname", pattern), ACCEPT])
    b.rule("input", [_match(_meta("iif"), "lo"), ACCEPT])
    # CVE-2019-14899: a packet for an address that is not on the interface it came in on
    # (e.g. the tunnel's address arriving on the uplink) is an attacker probing.
    fib_type = {"fib": {"result": "type", "flags": ["daddr", "iif"]}}
    for fam in (4, 6):
        b.rule("input", _drop_counted(
            Reason.SPOOFED_LOCAL, fam, _match(fib_type, _set(["local", "broadcast", "multicast"]), "!=")
        )["expr"])
    _nd_and_dhcp(b, "input", outbound=False)
    if policy.ipv6.mode == "block":
        b.rule("input", _drop_counted(Reason.IPV6_BLOCKED, 6)["expr"])
    for fam in (4, 6):
        b.rule("input", [_nfproto(fam), _match(_endpoint_key(fam, outbound=False), f"@endpoints{fam}"), ACCEPT])
    sock_mark = {"socket": {"key": "mark"}}
    b.rule("input", [_match(_meta("l4proto"), _set(["tcp", "udp"])), _mark_in_exempt_range(sock_mark), _jump("exempt_in")])
    b.rule("input", [_match(_meta("l4proto"), "tcp"), _match({"socket": {"key": "transparent"}}, 0), _jump("input_minisock")])
    if policy.lan.allow:
        for fam in (4, 6):
            b.rule("input", [_nfproto(fam), _match(_payload(FAMILIES[fam][0], "saddr"), f"@lan{fam}"), ACCEPT])
    for fam in (4, 6):
        b.rule("input", _drop_counted(Reason.INBOUND, fam)["expr"])

    # ---- forward (a container or VM routed through this host)
    for pattern in policy.tunnel.interfaces:
        b.rule("forward", [_ifname_matches("oifname", pattern), _jump("tunnel_out")])
        if policy.ipv6.mode == "block":
            b.rule("forward", _drop_counted(Reason.IPV6_BLOCKED, 6, _ifname_matches("iifname", pattern))["expr"])
        b.rule("forward", [_ifname_matches("iifname", pattern), ACCEPT])
    if policy.ipv6.mode == "block":
        b.rule("forward", _drop_counted(Reason.IPV6_BLOCKED, 6)["expr"])
    for fam in (4, 6):
        b.rule("forward", _drop_counted(Reason.DNS, fam, *_dns_match())["expr"])
    if policy.lan.allow:
        for fam in (4, 6):
            b.rule("forward", [_nfproto(fam), _match(_payload(FAMILIES[fam][0], "daddr"), f"@lan{fam}"), ACCEPT])
    for fam in (4, 6):
        b.rule("forward", _drop_counted(Reason.FORWARD, fam)["expr"])
    return b.cmds


def egress_chain_name(ifindex: int) -> str:
    return f"egress_if{ifindex}"


def _netdev(
    policy: Policy, uplinks: Mapping[int, str], counter_seeds: Mapping[str, tuple[int, int]], sets: list[SetSpec]
) -> list[Json]:
    """The last line against raw (AF_PACKET) senders: a netdev egress chain on every
    non-tunnel interface passes only ARP, DHCP, ND, endpoint, exempt and LAN traffic."""
    b = _Builder(policy, NETDEV)
    for fam in (4, 6):
        name = counter_name(Reason.RAW_EGRESS, fam)
        packets, nbytes = counter_seeds.get(name, (0, 0))
        b.add("counter", {"name": name, "packets": packets, "bytes": nbytes})
    b.shared_sets(sets)
    b.chain("egress_filter")
    f = "egress_filter"
    b.rule(f, [_match(_meta("protocol"), "arp"), ACCEPT])
    _nd_and_dhcp(b, f, outbound=True)
    for fam in (4, 6):
        proto = _match(_meta("protocol"), FAMILIES[fam][0])
        key = _endpoint_key(fam, outbound=True)
        b.rule(f, [proto, _match(_meta("mark"), policy.endpoint_mark), _match(key, f"@endpoints{fam}"), ACCEPT])
        ip = FAMILIES[fam][0]
        for kind, port_field in (("allow", "dport"), ("listen", "sport")):
            ex_key = {"concat": [_meta("mark"), _payload(ip, "daddr"), _meta("l4proto"), _payload("th", port_field)]}
            b.rule(f, [proto, _match(ex_key, f"@exempt_{kind}{fam}"), ACCEPT])
        if policy.lan.allow:
            b.rule(f, [proto, _match(_payload(ip, "daddr"), f"@lan{fam}"), ACCEPT])
    for fam in (4, 6):
        b.rule(f, [_match(_meta("protocol"), FAMILIES[fam][0]), _counter(counter_name(Reason.RAW_EGRESS, fam)), DROP])
    # Anything that is neither IPv4, IPv6 nor ARP falls to the chains' drop policy.
    for ifindex, dev in sorted(uplinks.items()):
        name = egress_chain_name(ifindex)
        b.chain(name, hook="egress", dev=dev)
        b.rule(name, [_jump(f)])
    return b.cmds


def render_nft(
    policy: Policy,
    uplinks: Mapping[int, str] | None = None,
    counter_seeds: Mapping[str, tuple[int, int]] | None = None,
    elements: bool = True,
) -> Json:
    """The whole ruleset as one atomic libnftables JSON batch.

    `uplinks` (ifindex -> name) are the non-tunnel interfaces present now, which get a
    netdev egress chain; `counter_seeds` carries counter values over a re-apply. Without
    `elements`, every set is empty: what is left is the ruleset's skeleton, which two
    policies share when only set contents tell them apart.
    """
    seeds = counter_seeds or {}
    cmds: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    for fam in (INET, NETDEV):
        table = {"family": fam, "name": TABLE}
        # add-then-delete: the delete cannot fail with ENOENT on the first run.
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    sets = shared_sets(policy, elements)
    cmds += _inet(policy, seeds, sets)
    cmds += _netdev(policy, uplinks or {}, seeds, sets)
    return {"nftables": cmds}


def render_nft_reset() -> Json:
    cmds: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    for fam in (INET, NETDEV):
        table = {"family": fam, "name": TABLE}
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}}]
    return {"nftables": cmds}


def render_exemption_change(before: Policy, after: Policy) -> Json | None:
    """Only the elements of the exemptions that differ between `before` and `after`, in one
    transaction: the old elements go, the new ones come (a packet sees one or the other).
    None when an exemption that stays would change its id (a rare crc collision shuffled
    them): then the ruleset is applied whole."""
    ids_before = exemption_ids([e.cgroup for e in before.exemptions])
    ids_after = exemption_ids([e.cgroup for e in after.exemptions])
    if any(ids_before[c] != ids_after[c] for c in ids_before.keys() & ids_after.keys()):
        return None
    old = {e.cgroup: e for e in before.exemptions}
    new = {e.cgroup: e for e in after.exemptions}
    # `is` first: an unchanged exemption is the same object, and dataclass == is slow at 10,000
    changed = sorted(c for c in old.keys() | new.keys() if old.get(c) is not new.get(c) and old.get(c) != new.get(c))
    cmds: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    for verb, side, ids in (("delete", old, ids_before), ("add", new, ids_after)):
        for table_family in (INET, NETDEV):
            for fam in (4, 6):
                for kind in ("allow", "listen"):
                    elems = [
                        el for c in changed if c in side
                        for el in exempt_elements(side[c], exempt_mark(ids[c]), fam, kind)
                    ]
                    if elems:
                        ref = {"family": table_family, "table": TABLE, "name": f"exempt_{kind}{fam}"}
                        cmds.append({verb: {"element": {**ref, "elem": elems}}})
    return {"nftables": cmds}


def render_set_changes(before: Policy, after: Policy) -> Json | None:
    """The set elements that take the kernel from `before` to `after`, in one transaction,
    for two policies whose rulesets share a skeleton (render_nft(elements=False) equal):
    the endpoints and exemptions that came and went, the LAN sets refilled when they
    differ. O(changed) where a whole render is O(n). None when exemption ids would shift
    (see render_exemption_change): then the ruleset is applied whole."""
    batch = render_exemption_change(before, after)
    if batch is None:
        return None
    cmds: list[Json] = batch["nftables"]
    same_endpoints = before.tunnel.endpoints == after.tunnel.endpoints  # C speed; hashing 10,000 is not
    for fam in (4, 6):
        old, new = (set(), set()) if same_endpoints else (set(before.endpoints(fam)), set(after.endpoints(fam)))
        lan_old, lan_new = _collapse(before.lan_networks(fam)), _collapse(after.lan_networks(fam))
        for table_family in (INET, NETDEV):
            ref = {"family": table_family, "table": TABLE, "name": f"endpoints{fam}"}
            if old - new:
                cmds.append({"delete": {"element": {**ref, "elem": [_endpoint_element(e) for e in sorted(old - new)]}}})
            if new - old:
                cmds.append({"add": {"element": {**ref, "elem": [_endpoint_element(e) for e in sorted(new - old)]}}})
            if lan_old != lan_new:
                lan = {"family": table_family, "table": TABLE, "name": f"lan{fam}"}
                cmds.append({"flush": {"set": lan}})
                if lan_new:
                    cmds.append({"add": {"element": {**lan, "elem": [_net(n) for n in lan_new]}}})
    return batch


def to_json(batch: Json) -> str:
    return json.dumps(batch, indent=1)
