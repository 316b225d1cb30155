"""macOS: a `Policy` as the PF anchor `ksbpf`, the main ruleset that calls it, and the
pfctl steps that load it atomically and roll it back. Pure: text out, no I/O.

How verdict() maps onto PF (pf.conf(5): the last matching rule wins unless it is `quick`):

- Every anchor rule is `quick` and they follow verdict()'s order of checks, so the first
  match decides; each direction ends in `block drop <dir> quick all`, so a packet that
  reaches the anchor is decided there and never by a rule after it.
- Every pass is `no state`: a packet is judged on its own, as verdict() judges it, and no
  state can carry a flow past a reload. load.sh flushes the states made before the rules.
- Interfaces: macOS PF has neither interface groups nor wildcards (xnu's pfi_kif_match
  compares interfaces by identity), so a glob `utun*` is rendered as the explicit list
  utun0 .. utun31 (GLOB_UNITS) and reported: any other name the glob matches stays
  blocked. A rule may name an interface that does not exist yet; it matches once it does.
- `set` options belong to the main ruleset: `pfctl -a ksbpf` drops them silently. pf.conf
  (the main ruleset load.sh installs) has `set skip on lo0` and calls the anchor before
  Apple's; the anchor passes lo0 itself too.
- macOS has no cgroups and PF cannot see socket marks. The endpoint exception is open to
  every local process unless `endpoint_user` names the tunnel client's user; an exemption
  is rendered only when `exempt_users` maps its cgroup to a user (PF `user`, which matches
  the owner of the local TCP/UDP socket). What is not rendered is listed in `unsupported`.
- Drops that come from the host, not from PF: net.inet.ip.check_interface=1 (set by
  load.sh) drops IPv4 packets for a local address arriving on another interface
  (CVE-2019-14899).
- `[bpf]` and `[metrics]` configure the Linux engine and daemon, not what passes; they
  have no counterpart here.

Limits, not per policy and so not in `unsupported`: PF has no forward hook (a routed
packet is filtered `in` on its input and `out` on its output interface); macOS has no IPv6
counterpart of check_interface; nothing survives a reboot (run load.sh at boot).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

from ksbpf.policy import Endpoint, IPNetwork, Policy, PortSpec
from ksbpf.render import _guard
from ksbpf.render.base import Rendered, Unsupported
from ksbpf.verdict import DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER, DNS_PORTS, ND_ICMPV6_TYPES

ANCHOR = "ksbpf"
# A glob is expanded to this many units: utun0 .. utun31.
GLOB_UNITS = 32
STATE_DIR = "/var/run/ksbpf"
LOOPBACK = "lo0"
TUNNEL_MACRO = "ksbpf_tunnel"

_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10}")

Direction = Literal["in", "out"]

# macOS's stock /etc/pf.conf, with ksbpf's options on top and its anchor first among the
# filter rules: Apple's anchors may hold `pass quick` rules, which would win if run first.
MAIN_RULESET = """\
# ksbpf: the main ruleset while the kill switch is engaged (macOS's stock /etc/pf.conf
# plus ksbpf's options and anchor). rollback.sh loads /etc/pf.conf again.
set skip on lo0
set block-policy drop
scrub-anchor "com.apple/*"
nat-anchor "com.apple/*"
rdr-anchor "com.apple/*"
dummynet-anchor "com.apple/*"
anchor "ksbpf"
anchor "com.apple/*"
load anchor "com.apple" from "/etc/pf.anchors/com.apple"
"""


# ------------------------------------------------------------------ refusing unsafe values


def _user(name: object, what: str) -> str:
    if not isinstance(name, str) or not _USER.fullmatch(name):
        raise ValueError(f"refusing to render {what} {name!r}: a macOS user name or uid")
    return name


# ------------------------------------------------------------------ PF text


def _q(s: str) -> str:
    # Quoted, a user name is always a STRING to pfctl's lexer, never a keyword or a
    # number; the checks above keep quotes and newlines out of it. Interface names go
    # bare into a macro: of A-Z a-z 0-9 _ . @ - only, the worst they can be is a keyword,
    # which pfctl -n refuses before anything is loaded.
    return f'"{s}"'


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + " ".join(items) + " }"


def _ports(spec: PortSpec) -> str:
    return str(spec.first) if spec.first == spec.last else f"{spec.first}:{spec.last}"


def tunnel_interfaces(patterns: Iterable[str]) -> list[str]:
    """The PF interface names for the policy's names and globs (a glob -> GLOB_UNITS units)."""
    names: list[str] = []
    for p in patterns:
        expanded = [f"{p[:-1]}{i}" for i in range(GLOB_UNITS)] if p.endswith("*") else [p]
        names += [n for n in expanded if len(n) <= 15 and n not in names]
    return names


def _dns(to: str) -> str:
    return f"proto {{ tcp udp }} to {to} port {_list([str(p) for p in DNS_PORTS])}"


def _af(family: int) -> str:
    return "inet" if family == 4 else "inet6"


class _Anchor:
    def __init__(self, policy: Policy, endpoint_user: str | None, exempt_users: Mapping[str, str]) -> None:
        self.p = policy
        self.endpoint_user = endpoint_user
        self.exempt_users = exempt_users
        self.tunnel_names = tunnel_interfaces(policy.tunnel.interfaces)
        self.tunnel = f"on ${TUNNEL_MACRO}"
        self.block6 = policy.ipv6.mode == "block"
        self.families = (4,) if self.block6 else (4, 6)
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def text(self) -> str:
        self.add(
            "# ksbpf anchor: rendered by ksbpf from a policy; load it with load.sh.",
            "# Every rule is quick and stateless: the first match decides, in verdict()'s order.",
            "",
            "# The tunnel interfaces. PF has no wildcards: a glob is spelled out unit by unit.",
            f'{TUNNEL_MACRO} = "{_list(self.tunnel_names)}"',
            "",
        )
        self._outbound()
        self.add("")
        self._inbound()
        return "\n".join(self.lines) + "\n"

    def _outbound(self) -> None:
        self.add("# outbound on the tunnel: " + ("no IPv6, then " if self.block6 else "") + "DNS only to the configured resolvers")
        if self.block6:
            self.add(f"block drop out quick {self.tunnel} inet6 all")
        servers = [str(s) for s in self.p.dns.servers if s.version in self.families]
        if servers:
            self.add(f"pass out quick {self.tunnel} {_dns(_list(servers))} no state")
        self.add(f"block drop out quick {self.tunnel} {_dns('any')}", f"pass out quick {self.tunnel} all no state")
        self.add(f"# loopback (pf.conf skips {LOOPBACK} already; this covers a main ruleset that does not)")
        self.add(f"pass out quick on {LOOPBACK} all no state")
        self.add("# neighbour discovery and DHCP on any interface" + (", before the IPv6 block (verdict() order)" if self.block6 else ""))
        self._nd_dhcp("out")
        if self.block6:
            self.add("block drop out quick inet6 all")
        if self.p.tunnel.endpoints:
            self.add("# VPN endpoints outside the tunnel" + (f", only for user {self.endpoint_user}" if self.endpoint_user else ""))
        for ep in self._endpoints():
            to = f"{_af(ep.family)} proto {ep.proto} to {ep.address} port {ep.port}"
            if self.endpoint_user is None:
                self.add(f"pass out quick {to} no state")
            else:
                # Anyone else's packet to the endpoint is dropped here, before exemptions and LAN.
                self.add(f"pass out quick {to} user {_q(self.endpoint_user)} no state", f"block drop out quick {to}")
        self._exemptions("out")
        self.add("# DNS outside the tunnel, before LAN: a LAN resolver is still a leak")
        self.add(f"block drop out quick {_dns('any')}")
        lan = self._lan()
        if lan:
            self.add("# LAN", f"pass out quick to {_list(lan)} no state")
        self.add("block drop out quick all")

    def _inbound(self) -> None:
        self.add("# inbound on the tunnel")
        if self.block6:
            self.add(f"block drop in quick {self.tunnel} inet6 all")
        self.add(f"pass in quick {self.tunnel} all no state")
        self.add(f"pass in quick on {LOOPBACK} all no state")
        self.add("# neighbour discovery and DHCP replies on any interface")
        self._nd_dhcp("in")
        if self.block6:
            self.add("block drop in quick inet6 all")
        if self.p.tunnel.endpoints:
            self.add("# VPN endpoints' replies")
        for ep in self._endpoints():
            self.add(f"pass in quick {_af(ep.family)} proto {ep.proto} from {ep.address} port {ep.port} no state")
        self._exemptions("in")
        lan = self._lan()
        if lan:
            self.add("# LAN", f"pass in quick from {_list(lan)} no state")
        self.add("block drop in quick all")

    def _nd_dhcp(self, d: Direction) -> None:
        nd = " ".join(map(str, ND_ICMPV6_TYPES))
        self.add(f"pass {d} quick inet6 proto icmp6 all icmp6-type {{ {nd} }} no state")
        for af, client, server in (("inet", DHCP4_CLIENT, DHCP4_SERVER), ("inet6", DHCP6_CLIENT, DHCP6_SERVER)):
            src, dst = (client, server) if d == "out" else (server, client)
            self.add(f"pass {d} quick {af} proto udp from any port {src} to any port {dst} no state")

    def _endpoints(self) -> list[Endpoint]:
        # In block mode IPv6 is dropped before the endpoints: their IPv6 rules would be dead.
        return [ep for ep in self.p.tunnel.endpoints if ep.family in self.families]

    def _lan(self) -> list[str]:
        return [str(n) for n in self.p.lan_networks(4) + self.p.lan_networks(6) if n.version in self.families]

    def _exemptions(self, d: Direction) -> None:
        for i, ex in enumerate(self.p.exemptions):
            user = self.exempt_users.get(ex.cgroup)
            if user is None:
                continue
            self.add(f"# exempt[{i}] {ex.cgroup} as user {user}")
            u = _q(user)
            for spec in ex.allow:
                nets = self._nets(ex.to)
                if nets is None:
                    continue
                if d == "out":
                    self.add(f"pass out quick proto {spec.proto} to {nets} port {_ports(spec)} user {u} no state")
                else:
                    self.add(f"pass in quick proto {spec.proto} from {nets} port {_ports(spec)} user {u} no state")
            for spec in ex.listen:
                nets = self._nets(ex.from_)
                if nets is None:
                    continue
                if d == "out":
                    self.add(f"pass out quick proto {spec.proto} from any port {_ports(spec)} to {nets} user {u} no state")
                else:
                    self.add(f"pass in quick proto {spec.proto} from {nets} to any port {_ports(spec)} user {u} no state")

    def _nets(self, nets: tuple[IPNetwork, ...]) -> str | None:
        """`any` for no networks (verdict's default), None when none is left in this mode."""
        if not nets:
            return "any"
        kept = [str(n) for n in nets if n.version in self.families]
        return _list(kept) if kept else None


def _unsupported(policy: Policy, endpoint_user: str | None, exempt_users: Mapping[str, str]) -> list[Unsupported]:
    out: list[Unsupported] = []
    for i, name in enumerate(policy.tunnel.interfaces):
        if name.endswith("*"):
            out.append(Unsupported(
                f"tunnel.interfaces[{i}]",
                f"macOS PF has no interface wildcards or groups; {name!r} is rendered as "
                f"{name[:-1]}0-{name[:-1]}{GLOB_UNITS - 1} and any other name it matches stays blocked",
            ))
    if policy.tunnel.endpoints and endpoint_user is None:
        if policy.tunnel.endpoint_mark is not None:
            out.append(Unsupported(
                "tunnel.endpoint_mark",
                "PF cannot match socket marks: every local process may reach the endpoints "
                "(name the tunnel client's user with endpoint_user to restrict them)",
            ))
        if policy.tunnel.endpoint_cgroups:
            out.append(Unsupported(
                "tunnel.endpoint_cgroups",
                "macOS has no cgroups: every local process may reach the endpoints "
                "(name the tunnel client's user with endpoint_user to restrict them)",
            ))
    for i, ex in enumerate(policy.exemptions):
        if ex.cgroup not in exempt_users:
            out.append(Unsupported(
                f"exempt[{i}].cgroup",
                f"macOS has no cgroups: {ex.cgroup} is not exempted and its traffic outside the tunnel "
                "stays blocked (map it to a macOS user with exempt_users to render it as PF `user` rules)",
            ))
    return out


# ------------------------------------------------------------------ load and rollback


def _heredoc(path: str, text: str, tag: str) -> str:
    # A quoted delimiter: the shell expands nothing inside. No rendered line can equal it.
    if tag in text.splitlines():
        raise ValueError(f"refusing to emit a heredoc whose text contains its delimiter {tag}")
    return f"cat > \"{path}\" <<'{tag}'\n{text}{tag}\n"


def _load_script(anchor: str, main: str) -> str:
    return (
        "#!/bin/sh\n"
        "# ksbpf: engage the PF kill switch on macOS (as root). Rendered by ksbpf; undo with rollback.sh.\n"
        "# Order: check both rulesets, load the anchor, then the main ruleset that calls it,\n"
        "# enable PF holding a reference, and drop the states made before the rules.\n"
        "set -eu\n"
        "umask 077\n"
        f"STATE={STATE_DIR}\n"
        'mkdir -p "$STATE"\n'
        "\n"
        + _heredoc("$STATE/anchor.conf", anchor, "KSBPF_ANCHOR")
        + "\n"
        + _heredoc("$STATE/main.conf", main, "KSBPF_MAIN")
        + "\n"
        "# Parse both first (-n loads nothing): a ruleset pfctl refuses changes nothing.\n"
        'pfctl -n -f "$STATE/main.conf"\n'
        f'pfctl -n -a {ANCHOR} -f "$STATE/anchor.conf"\n'
        "\n"
        "# IPv4 strong host model: a packet for a local address must arrive on that address's\n"
        "# interface (CVE-2019-14899). Set before PF changes, kept for rollback.sh.\n"
        '[ -f "$STATE/check_interface" ] || sysctl -n net.inet.ip.check_interface > "$STATE/check_interface"\n'
        "sysctl -w net.inet.ip.check_interface=1 > /dev/null\n"
        "\n"
        "# The anchor before the main ruleset: until the main ruleset calls it, it filters\n"
        "# nothing; the other way round PF would run an empty anchor and pass everything.\n"
        "# Each pfctl -f is one transaction: packets see the old rules or the new, never none.\n"
        f'pfctl -a {ANCHOR} -f - < "$STATE/anchor.conf"\n'
        'pfctl -f - < "$STATE/main.conf"\n'
        "\n"
        "# Enable PF holding a reference (pfctl -E prints a token); rollback.sh releases exactly\n"
        "# that one, so PF stays on for anyone else who enabled it. A re-run swaps its token.\n"
        "token=$(pfctl -E 2>&1 | sed -n 's/^Token : *//p')\n"
        'case "$token" in \'\'|*[!0-9]*) echo "ksbpf: pfctl -E gave no token" >&2; exit 1 ;; esac\n'
        'old=$(cat "$STATE/token" 2>/dev/null || true)\n'
        'echo "$token" > "$STATE/token"\n'
        'case "$old" in \'\'|*[!0-9]*) ;; *) pfctl -X "$old" 2>/dev/null || true ;; esac\n'
        "\n"
        "# A state matches before any rule. The anchor makes none (no state), so every state\n"
        "# predates it or comes from outside it, and any of them could carry a flow the anchor\n"
        "# now blocks: drop them all.\n"
        "pfctl -F states\n"
        "\n"
        "# Read back what the kernel holds.\n"
        "pfctl -s info | grep -q '^Status: Enabled' || { echo 'ksbpf: PF is not enabled' >&2; exit 1; }\n"
        f"pfctl -a {ANCHOR} -s rules | grep -q . || {{ echo 'ksbpf: anchor {ANCHOR} is empty' >&2; exit 1; }}\n"
        "echo 'ksbpf: PF kill switch engaged'\n"
    )


def _rollback_script() -> str:
    return (
        "#!/bin/sh\n"
        "# ksbpf: the emergency key. Removes the PF kill switch and restores the system's\n"
        "# PF configuration (as root). Every step runs even if one before it failed.\n"
        "# If PF still blocks afterwards, `pfctl -d` disables PF altogether.\n"
        "set -u\n"
        f"STATE={STATE_DIR}\n"
        "rc=0\n"
        "# The system's main ruleset first: after it nothing calls the anchor.\n"
        "pfctl -f /etc/pf.conf || rc=1\n"
        f"pfctl -a {ANCHOR} -F rules || rc=1\n"
        "# Release the reference load.sh took; PF stays enabled only if someone else holds one.\n"
        'token=$(cat "$STATE/token" 2>/dev/null || true)\n'
        'case "$token" in \'\'|*[!0-9]*) ;; *) pfctl -X "$token" || rc=1 ;; esac\n'
        'old=$(cat "$STATE/check_interface" 2>/dev/null || true)\n'
        'case "$old" in 0|1) sysctl -w net.inet.ip.check_interface="$old" > /dev/null || rc=1 ;; esac\n'
        '[ "$rc" -eq 0 ] && rm -rf "$STATE"\n'
        '[ "$rc" -eq 0 ] && echo "ksbpf: PF kill switch removed" || echo "ksbpf: rollback incomplete, see above" >&2\n'
        'exit "$rc"\n'
    )


# ------------------------------------------------------------------ entry point


def render_pf(
    policy: Policy,
    *,
    endpoint_user: str | None = None,
    exempt_users: Mapping[str, str] | None = None,
) -> Rendered:
    """The PF rendering of `policy`: files `ksbpf.anchor` (the anchor's rules), `pf.conf`
    (the main ruleset load.sh installs), `load.sh` and `rollback.sh`.

    `endpoint_user` (a macOS user name or uid) restricts the endpoint exception to the
    tunnel client's sockets; `exempt_users` maps an exemption's cgroup to the macOS user
    whose sockets it stands for. Raises ValueError for any value it cannot render safely.
    """
    _guard.check_policy(policy)
    users = dict(exempt_users or {})
    if endpoint_user is not None:
        _user(endpoint_user, "endpoint_user")
    for cg, user in users.items():
        _guard.cgroup(cg, "exempt_users cgroup")
        _user(user, f"user for {cg}")
    known = {ex.cgroup for ex in policy.exemptions}
    stray = sorted(set(users) - known)
    if stray:
        raise ValueError(f"exempt_users names cgroups the policy does not exempt: {', '.join(stray)}")
    # One user per identity: a user shared by two grants would get both (PF sees only the user).
    named = [*users.values(), *([endpoint_user] if endpoint_user is not None else [])]
    shared = sorted({u for u in named if named.count(u) > 1})
    if shared:
        raise ValueError(f"a macOS user may stand for one cgroup or the tunnel client only: {', '.join(shared)}")
    anchor = _Anchor(policy, endpoint_user, users).text()
    files = {
        "ksbpf.anchor": anchor,
        "pf.conf": MAIN_RULESET,
        "load.sh": _load_script(anchor, MAIN_RULESET),
        "rollback.sh": _rollback_script(),
    }
    for name, text in files.items():
        _guard.printable(name, text)
    return Rendered("macos", files, tuple(_unsupported(policy, endpoint_user, users)))
