"""A small model of macOS PF for tests: parse the rulesets ksbpf renders, decide packets the
way PF does. Independent of the renderer: it reads the text, not the renderer's data.

Semantics modelled (pf.conf(5); xnu's pf is OpenBSD 4.x's):
- Filter rules are evaluated top to bottom and the LAST matching rule wins, unless a
  matching rule is `quick`, which decides at once. No matching rule: the packet passes.
- `anchor "name"` evaluates that anchor's rules in place: a quick match inside it ends the
  whole evaluation; a non-quick match counts as the last match so far. `anchor "a/*"`
  evaluates a's child anchors (the test world gives Apple's none).
- `set skip on IF`: packets on IF are not filtered at all.
- Macros `name = "value"` are substituted for `$name`; `{ a b }` lists match any element.
- `on IF`: exact interface names (xnu has no interface groups or wildcards); `in`/`out`;
  `inet`/`inet6`; `proto`; `from`/`to` hosts (`any`, an address, a network, a list) each
  with `port N`, `port a:b` (inclusive) or a list; `all` = from any to any; `icmp6-type`;
  `user U` (TCP/UDP only: the owner of the local socket; no socket, no match).
- State: only `no state` is accepted. A rule that would keep state is refused, because
  this model judges packets one by one and could not account for it.

Anything else (nat, rdr, tables, tags, route-to, keep state, negation...) raises
PfSyntaxError: the renderer cannot slip past the model with syntax it does not know.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
PROTO_NAMES = {"tcp", "udp", "icmp", "icmp6", "gre", "esp"}


class PfSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class PfPacket:
    direction: str  # "in" | "out"
    ifname: str
    af: int
    proto: str  # tcp udp icmp icmp6 gre ...
    src: Addr | None
    dst: Addr | None
    sport: int = 0
    dport: int = 0
    icmp_type: int | None = None
    user: str | None = None


@dataclass
class Hosts:
    nets: list[Net] | None = None  # None: any
    ports: list[tuple[int, int]] | None = None

    def match_addr(self, a: Addr | None) -> bool:
        if self.nets is None:
            return True
        return a is not None and any(a.version == n.version and a in n for n in self.nets)

    def families(self) -> set[int]:
        return {4, 6} if self.nets is None else {n.version for n in self.nets}


@dataclass
class Rule:
    text: str
    action: str  # pass | block
    direction: str | None = None
    quick: bool = False
    ifnames: set[str] | None = None
    af: int | None = None
    protos: set[str] | None = None
    src: Hosts = field(default_factory=Hosts)
    dst: Hosts = field(default_factory=Hosts)
    icmp6_types: set[int] | None = None
    user: str | None = None
    anchor: str | None = None  # an `anchor "name"` call instead of a filter rule

    def matches(self, p: PfPacket) -> bool:
        if self.direction is not None and self.direction != p.direction:
            return False
        if self.ifnames is not None and p.ifname not in self.ifnames:
            return False
        if self.af is not None and self.af != p.af:
            return False
        if self.protos is not None and p.proto not in self.protos:
            return False
        for hosts, addr, port in ((self.src, p.src, p.sport), (self.dst, p.dst, p.dport)):
            if hosts.nets is not None and p.af not in hosts.families():
                return False
            if not hosts.match_addr(addr):
                return False
            if hosts.ports is not None:
                if p.proto not in ("tcp", "udp") or not any(a <= port <= b for a, b in hosts.ports):
                    return False
        if self.icmp6_types is not None and (p.proto != "icmp6" or p.icmp_type not in self.icmp6_types):
            return False
        if self.user is not None and (p.proto not in ("tcp", "udp") or p.user != self.user):
            return False
        return True


@dataclass
class Ruleset:
    rules: list[Rule]
    skip: set[str] = field(default_factory=set)
    options: dict[str, str] = field(default_factory=dict)


_TOKEN = re.compile(r'\s*(?:(\{|\}|,)|"([^"\n]*)"|([^\s{},"]+))')


def _tokens(line: str) -> list[str]:
    out, pos = [], 0
    line = line.strip()
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        if not m or m.end() == pos:
            raise PfSyntaxError(f"cannot tokenize {line[pos:]!r}")
        pos = m.end()
        if m.group(1) == ",":
            continue
        out.append(m.group(1) or (m.group(2) if m.group(2) is not None else m.group(3)))
    return out


class _Stream:
    def __init__(self, toks: list[str], text: str) -> None:
        self.toks, self.i, self.text = toks, 0, text

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        if self.i >= len(self.toks):
            raise PfSyntaxError(f"unexpected end of rule: {self.text}")
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, word: str) -> bool:
        if self.peek() == word:
            self.i += 1
            return True
        return False

    def items(self) -> list[str]:
        t = self.take()
        if t != "{":
            return [t]
        out = []
        while (t := self.take()) != "}":
            out.append(t)
        return out


def _port_item(t: str) -> tuple[int, int]:
    a, sep, b = t.partition(":")
    lo, hi = int(a), int(b) if sep else int(a)
    if not (0 <= lo <= hi <= 65535):
        raise PfSyntaxError(f"bad port {t!r}")
    return lo, hi


def _hosts(s: _Stream) -> Hosts:
    items = s.items()
    h = Hosts()
    if items != ["any"]:
        try:
            h.nets = [ipaddress.ip_network(x, strict=True) for x in items]
        except ValueError as e:
            raise PfSyntaxError(f"bad host in {s.text!r}: {e}") from None
    if s.accept("port"):
        h.ports = [_port_item(x) for x in s.items()]
    return h


def parse_rule(text: str) -> Rule:
    s = _Stream(_tokens(text), text)
    first = s.take()
    if first == "anchor":
        r = Rule(text, "anchor", anchor=s.take())
        if s.peek() is not None:
            raise PfSyntaxError(f"unmodelled anchor options: {text}")
        return r
    if first not in ("pass", "block"):
        raise PfSyntaxError(f"not a filter rule: {text}")
    r = Rule(text, first)
    if first == "block" and not s.accept("drop") and s.peek() == "return":
        raise PfSyntaxError(f"block return is not modelled: {text}")
    if s.peek() in ("in", "out"):
        r.direction = s.take()
    r.quick = s.accept("quick")
    if s.accept("on"):
        names = s.items()
        if any(n.startswith("!") for n in names):
            raise PfSyntaxError(f"interface negation is not modelled: {text}")
        r.ifnames = set(names)
    if s.peek() in ("inet", "inet6"):
        r.af = 4 if s.take() == "inet" else 6
    if s.accept("proto"):
        r.protos = set(s.items())
        if not r.protos <= PROTO_NAMES:
            raise PfSyntaxError(f"unknown protocol in {text}")
    if s.accept("all"):
        pass
    else:
        if s.accept("from"):
            r.src = _hosts(s)
        if s.accept("to"):
            r.dst = _hosts(s)
    stateless = False
    while (t := s.peek()) is not None:
        s.take()
        if t == "icmp6-type":
            r.icmp6_types = {int(x) for x in s.items()}
        elif t == "user":
            (r.user,) = s.items()
        elif t == "no" and s.accept("state"):
            stateless = True
        else:
            raise PfSyntaxError(f"unmodelled option {t!r} in {text}")
    for hosts in (r.src, r.dst):
        if hosts.ports is not None and not (r.protos and r.protos <= {"tcp", "udp"}):
            raise PfSyntaxError(f"port without proto tcp/udp (pfctl refuses it): {text}")
    if r.af is not None:
        for hosts in (r.src, r.dst):
            if hosts.nets is not None and r.af not in hosts.families():
                raise PfSyntaxError(f"address family mismatch (pfctl refuses it): {text}")
    if r.action == "pass" and not stateless:
        # PF's default is keep state; the model judges packets one by one.
        raise PfSyntaxError(f"pass rule without 'no state': {text}")
    return r


def parse(text: str) -> Ruleset:
    macros: dict[str, str] = {}
    rs = Ruleset([])
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"([^"]*)"', line)
        if m:
            macros[m.group(1)] = m.group(2)
            continue

        def expand(mm: re.Match[str]) -> str:
            if mm.group(1) not in macros:
                raise PfSyntaxError(f"undefined macro ${mm.group(1)}")
            return macros[mm.group(1)]

        line = re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)", expand, line)
        words = line.split()
        if words[0] == "set":
            if words[1] == "skip":
                if words[2] != "on":
                    raise PfSyntaxError(line)
                rs.skip |= set(_tokens(" ".join(words[3:]))) - {"{", "}"}
            else:
                rs.options[words[1]] = " ".join(words[2:])
            continue
        if words[0] in ("scrub-anchor", "nat-anchor", "rdr-anchor", "dummynet-anchor") or words[:2] == ["load", "anchor"]:
            continue  # not filter rules; Apple's anchors are empty in the test world
        rs.rules.append(parse_rule(line))
    return rs


@dataclass
class Pf:
    """The main ruleset plus the anchors it calls."""

    main: Ruleset
    anchors: dict[str, Ruleset]

    def passes(self, p: PfPacket) -> bool:
        if p.ifname in self.main.skip:
            return True
        last = ["pass"]
        self._walk(self.main, p, last)
        return last[0] == "pass"

    def _walk(self, rs: Ruleset, p: PfPacket, last: list[str]) -> bool:
        """True once a quick rule has decided."""
        for r in rs.rules:
            if r.anchor is not None:
                name = r.anchor
                children = [k for k in self.anchors if k.startswith(name[:-1])] if name.endswith("/*") else [name]
                for child in sorted(children):
                    if child in self.anchors and self._walk(self.anchors[child], p, last):
                        return True
                continue
            if r.matches(p):
                last[0] = r.action
                if r.quick:
                    return True
        return False

    def deciding_rule(self, p: PfPacket) -> str:
        """The text of the rule that decided `p` (for failure messages)."""
        found = ["(no rule: default pass)"]

        def walk(rs: Ruleset) -> bool:
            for r in rs.rules:
                if r.anchor is not None:
                    if r.anchor in self.anchors and walk(self.anchors[r.anchor]):
                        return True
                    continue
                if r.matches(p):
                    found[0] = r.text
                    if r.quick:
                        return True
            return False

        if p.ifname in self.main.skip:
            return "set skip"
        walk(self.main)
        return found[0]
