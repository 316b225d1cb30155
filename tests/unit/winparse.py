"""A small model of Windows Defender Firewall for tests: parse the apply.ps1 ksbpf renders,
decide packets the way the firewall does. It reads the script's text, not the renderer's
data.

Semantics modelled (MS-FASP 2.2.34, FW_RULE_ACTION): among the rules that match a packet,
an allow-bypass rule beats a block rule and a block rule beats an allow rule; rule order
means nothing. With no matching rule, the profile's default action for the direction
applies. ksbpf's script sets every profile alike, so the model keeps one default per
direction. A rule matches when every condition it names matches:
  Direction; InterfaceAlias (PowerShell -like patterns, case-insensitive; $TunnelAliases
  are the adapters matching $TunnelPatterns); Protocol (TCP, UDP, ICMPv4, ICMPv6, or any);
  LocalPort / RemotePort (numbers or a-b ranges, TCP/UDP only); RemoteAddress (addresses,
  a/len subnets, a-b ranges); IcmpType; Service and Program (the local socket's owner).
Host behaviour modelled around the rules: loopback traffic is not filtered, and the
strong host model drops a packet for a local address arriving on another interface.
The firewall is stateful, but every reply to a flow ksbpf's rules allow is also allowed
by its inbound rules (and by verdict()), so judging packets one by one loses nothing.

What the model assumes and the tests check in the script's text: the firewall holds only
ksbpf's rules (apply.ps1 disables the others) and every profile has the same defaults.
Unknown keys, values or statements in the rule table raise WinSyntaxError.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "ICMPv4": "icmp", "ICMPv6": "icmpv6"}
KEYS = {
    "Name", "DisplayName", "Direction", "Action", "InterfaceAlias", "Protocol", "LocalPort",
    "RemotePort", "RemoteAddress", "IcmpType", "Service", "Program",
}


class WinSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class WinPacket:
    direction: str  # Outbound | Inbound
    interface: str
    proto: str  # tcp udp icmp icmpv6 gre ...
    remote: Addr
    local_port: int = 0
    remote_port: int = 0
    icmp_type: int | None = None
    service: str | None = None
    program: str | None = None
    loopback: bool = False
    arrived_on_own_interface: bool = True


def like(pattern: str, text: str) -> bool:
    """PowerShell -like: * ? [..] wildcards, backtick escapes, case-insensitive."""
    rx, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "`" and i + 1 < len(pattern):
            rx += re.escape(pattern[i + 1])
            i += 2
            continue
        if c == "*":
            rx += ".*"
        elif c == "?":
            rx += "."
        elif c == "[":
            j = pattern.index("]", i)
            rx += "[" + pattern[i + 1:j].replace("\\", "\\\\") + "]"
            i = j
        else:
            rx += re.escape(c)
        i += 1
    return re.fullmatch(rx, text, re.IGNORECASE) is not None


def _ports(values: list[str]) -> list[tuple[int, int]]:
    out = []
    for v in values:
        a, sep, b = v.partition("-")
        lo, hi = int(a), int(b) if sep else int(a)
        if not 0 <= lo <= hi <= 65535:
            raise WinSyntaxError(f"bad port {v!r}")
        out.append((lo, hi))
    return out


def _address_item(v: str) -> tuple[Addr, Addr]:
    try:
        if "/" in v:
            n = ipaddress.ip_network(v, strict=True)
            return n.network_address, n.broadcast_address
        a, sep, b = v.partition("-")
        lo, hi = ipaddress.ip_address(a), ipaddress.ip_address(b) if sep else ipaddress.ip_address(a)
    except ValueError as e:
        raise WinSyntaxError(f"bad address {v!r}: {e}") from None
    if lo.version != hi.version or int(lo) > int(hi):
        raise WinSyntaxError(f"bad range {v!r}")
    return lo, hi


@dataclass
class WinRule:
    fields: dict[str, str | list[str]]
    tunnel_patterns: list[str]

    def __post_init__(self) -> None:
        f = self.fields
        if set(f) - KEYS:
            raise WinSyntaxError(f"unmodelled keys {sorted(set(f) - KEYS)}")
        for k in ("Name", "DisplayName", "Direction", "Action"):
            if k not in f:
                raise WinSyntaxError(f"rule without {k}: {f}")
        if f["Direction"] not in ("Outbound", "Inbound") or f["Action"] not in ("Allow", "Block"):
            raise WinSyntaxError(f"bad direction or action: {f}")
        proto = f.get("Protocol")
        if proto is not None and proto not in PROTOCOLS:
            raise WinSyntaxError(f"unmodelled protocol {proto!r}")
        if ("LocalPort" in f or "RemotePort" in f) and proto not in ("TCP", "UDP"):
            raise WinSyntaxError(f"ports need Protocol TCP or UDP (New-NetFirewallRule refuses): {f['Name']}")
        if "IcmpType" in f and proto not in ("ICMPv4", "ICMPv6"):
            raise WinSyntaxError(f"IcmpType needs an ICMP protocol: {f['Name']}")
        self.local_ports = _ports(self._list("LocalPort")) if "LocalPort" in f else None
        self.remote_ports = _ports(self._list("RemotePort")) if "RemotePort" in f else None
        self.remote = [_address_item(v) for v in self._list("RemoteAddress")] if "RemoteAddress" in f else None
        self.icmp = {int(v.split(":")[0]) for v in self._list("IcmpType")} if "IcmpType" in f else None

    def _list(self, key: str) -> list[str]:
        v = self.fields[key]
        return v if isinstance(v, list) else [v]

    @property
    def name(self) -> str:
        return str(self.fields["Name"])

    @property
    def action(self) -> str:
        return str(self.fields["Action"])

    def matches(self, p: WinPacket) -> bool:
        f = self.fields
        if f["Direction"] != p.direction:
            return False
        if "InterfaceAlias" in f:
            patterns = self.tunnel_patterns if f["InterfaceAlias"] == "$TunnelAliases" else self._list("InterfaceAlias")
            if not any(like(pat, p.interface) for pat in patterns):
                return False
        if "Protocol" in f and PROTOCOLS[str(f["Protocol"])] != p.proto:
            return False
        if self.local_ports is not None and not any(a <= p.local_port <= b for a, b in self.local_ports):
            return False
        if self.remote_ports is not None and not any(a <= p.remote_port <= b for a, b in self.remote_ports):
            return False
        if self.remote is not None and not any(
            lo.version == p.remote.version and int(lo) <= int(p.remote) <= int(hi) for lo, hi in self.remote
        ):
            return False
        if self.icmp is not None and p.icmp_type not in self.icmp:
            return False
        if "Service" in f and (p.service is None or p.service.lower() != str(f["Service"]).lower()):
            return False
        if "Program" in f and (p.program is None or p.program.lower() != str(f["Program"]).lower()):
            return False
        return True


@dataclass
class Firewall:
    rules: list[WinRule]
    default: dict[str, str] = field(default_factory=dict)  # direction -> Allow | Block
    tunnel_patterns: list[str] = field(default_factory=list)

    def allows(self, p: WinPacket) -> bool:
        if p.loopback:
            return True
        if p.direction == "Inbound" and not p.arrived_on_own_interface:
            return False
        matched = [r for r in self.rules if r.matches(p)]
        if any(r.action == "Block" for r in matched):
            return False
        if any(r.action == "Allow" for r in matched):
            return True
        return self.default[p.direction] == "Allow"

    def explain(self, p: WinPacket) -> str:
        matched = [r.name for r in self.rules if r.matches(p)]
        return f"matched {matched or 'nothing'}; default {self.default[p.direction]}"


# ------------------------------------------------------------------ reading the script

def _ps_values(text: str) -> str | list[str]:
    """'x' | @('a', 'b') | $Var -> str | list[str]."""
    text = text.strip()
    if text.startswith("$"):
        if not re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", text):
            raise WinSyntaxError(f"bad variable {text!r}")
        return text
    if text.startswith("'"):
        m = re.fullmatch(r"'((?:[^']|'')*)'", text)
        if not m:
            raise WinSyntaxError(f"bad string {text!r}")
        return m.group(1).replace("''", "'")
    m = re.fullmatch(r"@\((.*)\)", text)
    if not m:
        raise WinSyntaxError(f"unmodelled value {text!r}")
    items = re.findall(r"'((?:[^']|'')*)'", m.group(1))
    rebuilt = ", ".join("'" + i + "'" for i in items)
    if rebuilt != m.group(1).strip():
        raise WinSyntaxError(f"unmodelled array {text!r}")
    return [i.replace("''", "'") for i in items]


def _split_hashtable(body: str) -> list[tuple[str, str]]:
    """`K = v; K2 = @('a', 'b')` -> pairs, splitting on ; outside quotes."""
    parts, cur, quoted = [], "", False
    for c in body:
        if c == "'":
            quoted = not quoted
        if c == ";" and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    out = []
    for part in parts:
        k, sep, v = part.partition("=")
        if not sep or not re.fullmatch(r"\s*[A-Za-z]+\s*", k):
            raise WinSyntaxError(f"bad hashtable entry {part!r}")
        out.append((k.strip(), v.strip()))
    return out


def parse(script: str) -> Firewall:
    lines = script.splitlines()
    fw = Firewall([])
    m = next((re.fullmatch(r"\$TunnelPatterns = (@\(.*\))", ln) for ln in lines if ln.startswith("$TunnelPatterns")), None)
    if m is None:
        raise WinSyntaxError("no $TunnelPatterns")
    patterns = _ps_values(m.group(1))
    assert isinstance(patterns, list)
    fw.tunnel_patterns = patterns
    start = lines.index("$Rules = @(")
    end = lines.index(")", start)
    for ln in lines[start + 1:end]:
        m = re.fullmatch(r"    @\{ (.*) \}", ln)
        if not m:
            raise WinSyntaxError(f"unmodelled line in the rule table: {ln!r}")
        fields = {k: _ps_values(v) for k, v in _split_hashtable(m.group(1))}
        for k, v in fields.items():
            if isinstance(v, str) and v.startswith("$") and (k, v) != ("InterfaceAlias", "$TunnelAliases"):
                raise WinSyntaxError(f"unmodelled variable {v} for {k}")
        fw.rules.append(WinRule(fields, patterns))
    profiles = [ln for ln in lines if ln.startswith("Set-NetFirewallProfile ")]
    if len(profiles) != 1:
        raise WinSyntaxError(f"expected one Set-NetFirewallProfile, found {len(profiles)}")
    prof = profiles[0]
    if "-Profile @('Domain', 'Private', 'Public')" not in prof or "-Enabled True" not in prof:
        raise WinSyntaxError(f"the defaults must cover every profile and enable it: {prof}")
    for d, key in (("Inbound", "DefaultInboundAction"), ("Outbound", "DefaultOutboundAction")):
        mm = re.search(rf"-{key} (Allow|Block)\b", prof)
        if not mm:
            raise WinSyntaxError(f"no {key} in {prof}")
        fw.default[d] = mm.group(1)
    names = [r.name for r in fw.rules]
    if len(set(names)) != len(names):
        raise WinSyntaxError("duplicate rule names")
    return fw
