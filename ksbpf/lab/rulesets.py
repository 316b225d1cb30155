"""The lab's pure parts: the server's nftables rulesets (the uplink filter and the far-side
leak counter), the reader of that counter, and the client's policy as TOML. No I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksbpf.lab.addresses import (
    CLIENT_WG_PORT,
    COUNTER_TABLE,
    ENDPOINT_PORT,
    SERVER_V4,
    TUN_NET_V4,
    TUN_NET_V6,
    UPLINK,
)
from ksbpf.lab.processes import LabError


@dataclass(frozen=True)
class Counters:
    """What the far side of the uplink saw since the last reset."""

    tunnel: int
    leaks: int
    link: int
    details: tuple[str, ...] = ()


def _toml_value(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return hex(v) if key.endswith("mark") else str(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(key, x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(k, x)}" for k, x in v.items()) + " }"
    raise LabError(f"cannot write {type(v).__name__} for {key!r} as TOML")


def render_toml(data: Mapping[str, Any]) -> str:
    """A policy as TOML: tables and arrays of tables one level deep, which is all
    DESIGN.md's policy file has. None values are left out."""
    head: list[str] = []
    body: list[str] = []

    def table(header: str, items: Mapping[str, Any]) -> None:
        body.extend(["", header] + [f"{k} = {_toml_value(k, v)}" for k, v in items.items() if v is not None])

    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            table(f"[{key}]", value)
        elif isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
            for item in value:
                table(f"[[{key}]]", item)
        else:
            head.append(f"{key} = {_toml_value(key, value)}")
    lines = head + body
    return "\n".join(lines).lstrip("\n") + "\n"


def merge_policy(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Table-wise merge: a dict override updates that table key by key, anything else
    (a list of [[exempt]] tables, None to drop the table) replaces it."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k].update(v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def counter_ruleset(uplink: str = UPLINK, *, client_port: int = CLIENT_WG_PORT) -> str:
    """The far-side leak counter: a netdev ingress chain on the server's uplink.
    Loaded as one transaction that also replaces any previous copy (a reset)."""
    key4 = "ip saddr . ip daddr . meta l4proto"
    key6 = "ip6 saddr . ip6 daddr . meta l4proto"
    dyn = "flags dynamic; size 4096; counter;"
    # WireGuard messages start with a type byte 1-4 and three zero bytes, so plaintext
    # sent from the tunnel's own port still counts as a leak.
    wg_types = "{ 0x01000000, 0x02000000, 0x03000000, 0x04000000 }"
    l4 = "{ tcp, udp, sctp, dccp, udplite }"
    return f"""\
table netdev {COUNTER_TABLE} {{}}
delete table netdev {COUNTER_TABLE}
table netdev {COUNTER_TABLE} {{
  counter tunnel {{}}
  counter leaks {{}}
  counter link {{}}
  set leak4 {{ typeof {key4} . th dport; {dyn} }}
  set leak4o {{ typeof {key4}; {dyn} }}
  set leak4i {{ typeof ip saddr . ip daddr . icmp type . icmp code; {dyn} }}
  set leak6 {{ typeof {key6} . th dport; {dyn} }}
  set leak6o {{ typeof {key6}; {dyn} }}
  set leak6i {{ typeof ip6 saddr . ip6 daddr . icmpv6 type . icmpv6 code; {dyn} }}
  set leakx {{ typeof ether type; {dyn} }}
  chain ingress {{
    type filter hook ingress device "{uplink}" priority -500; policy accept;
    ether type arp counter name link accept
    icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report }} counter name link accept
    ip daddr {SERVER_V4} udp sport {client_port} udp dport {ENDPOINT_PORT} @th,64,32 {wg_types} counter name tunnel accept
    counter name leaks
    meta protocol ip meta l4proto {l4} update @leak4 {{ {key4} . th dport }} accept
    meta protocol ip meta l4proto icmp update @leak4i {{ ip saddr . ip daddr . icmp type . icmp code }} accept
    meta protocol ip update @leak4o {{ {key4} }} accept
    meta protocol ip6 meta l4proto {l4} update @leak6 {{ {key6} . th dport }} accept
    meta protocol ip6 meta l4proto ipv6-icmp update @leak6i {{ ip6 saddr . ip6 daddr . icmpv6 type . icmpv6 code }} accept
    meta protocol ip6 update @leak6o {{ {key6} }} accept
    update @leakx {{ ether type }}
  }}
}}
"""


def server_filter_ruleset() -> str:
    """The server never forwards to or from the uplink, and answers on its tunnel
    addresses only through the tunnel: the target and the tunnel's resolver are
    reachable only through the tunnel, so a reply from them proves the tunnel path."""
    return f"""\
table inet ksbpflab {{}}
delete table inet ksbpflab
table inet ksbpflab {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{UPLINK}" ip daddr {TUN_NET_V4} drop
    iifname "{UPLINK}" ip6 daddr {TUN_NET_V6} drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{UPLINK}" drop
    oifname "{UPLINK}" drop
  }}
}}
"""


def parse_counters(doc: Mapping[str, Any]) -> Counters:
    """`nft -j list table netdev ksbpflab` -> Counters, with one line per leaked flow."""
    counts: dict[str, int] = {}
    flows: list[tuple[int, str]] = []
    for obj in doc.get("nftables", []):
        if "counter" in obj:
            counts[obj["counter"]["name"]] = int(obj["counter"]["packets"])
        elif "set" in obj:
            for elem in obj["set"].get("elem", []):
                e: Any = elem.get("elem", elem) if isinstance(elem, Mapping) else {"val": elem}
                val, packets = e.get("val"), int(e.get("counter", {}).get("packets", 0))
                flows.append((packets, _describe_flow(obj["set"]["name"], val)))
    flows.sort(key=lambda f: (-f[0], f[1]))
    return Counters(
        tunnel=counts.get("tunnel", 0),
        leaks=counts.get("leaks", 0),
        link=counts.get("link", 0),
        details=tuple(f"{d} ×{n}" for n, d in flows),
    )


def _describe_flow(set_name: str, val: Any) -> str:
    parts = val["concat"] if isinstance(val, Mapping) and "concat" in val else [val]
    if set_name == "leakx":
        return f"ethertype {parts[0]}"
    if set_name in ("leak4i", "leak6i"):
        return f"{'icmp' if set_name == 'leak4i' else 'icmpv6'} {parts[0]} → {parts[1]} {parts[2]}/{parts[3]}"
    src, dst, proto = str(parts[0]), str(parts[1]), str(parts[2])
    if len(parts) > 3:
        host = f"[{dst}]" if ":" in dst else dst
        return f"{proto} {src} → {host}:{parts[3]}"
    return f"{proto} {src} → {dst}"
