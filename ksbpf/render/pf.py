"""macOS: a `Policy` as the PF anchor `ksbpf`, the main ruleset that calls it, and the
pfctl steps that load it atomically and roll it back. Pure: text out, no I/O.

How verdict() maps onto PF (pf.conf(5): the last matching rule wins unless it is `quick`):

- Every anchor rule is `quick` and they follow verdict()'s order of checks, so the first
  match decides; each direction ends in `block drop <dir> quick all`, so a packet that
  reaches the anchor is decided there and never by a rule after it.
- Every pass is `no state`: a packet is judged on its own, as verdict() judges it, and no
  state can carry a flow past a reload. load.sh flushes the states made before the rules.
- Interfaces: macOS PF has neither interface groups nor wildcards (xnu's pfi_kif_match
  compares a rule's interface with the packet's by identity, and xnu has no ifgroups), so
  a renumbered tunnel is followed the only way PF allows: a glob `utun*` is rendered as
  the explicit family utun0 .. utun31 (GLOB_UNITS) and reported; any other name the glob
  matches stays blocked. A rule may name an interface that does not exist yet; it matches
  once it does. Write `utun*`, not `utun4`, for a client whose unit number changes.
- `set` options belong to the main ruleset: `pfctl -a ksbpf` drops them silently. pf.conf
  (the main ruleset load.sh installs) has `set skip on lo0` and calls the anchor before
  Apple's; the anchor passes lo0 itself too.
- macOS has no cgroups and PF cannot see socket marks. The endpoint exception is open to
  every local process unless `[tunnel.macos] endpoint_user` names the tunnel client's user;
  an exemption is rendered only when its `[exempt.macos] user` names one (PF `user`
  matches the owner of the local TCP/UDP socket). What is not rendered is listed in
  `unsupported`, by the key that would render it.
- Drops that come from the host, not from PF: net.inet.ip.check_interface=1 (set by
  load.sh) drops IPv4 packets for a local address arriving on another interface
  (CVE-2019-14899).
- `[bpf]` and `[metrics]` configure the Linux engine and daemon, not what passes; they
  have no counterpart here.

- The main ruleset is the system's /etc/pf.conf (given as `pf_conf`; Apple's stock file
  when None) with ksbpf's options on top and `anchor "ksbpf"` before its first filter
  rule: /etc/pf.conf itself is never written. Loading it replaces the main ruleset, so
  anchors a system service inserted at run time are dropped until it inserts them again.

Limits, not per policy and so not in `unsupported`: PF has no forward hook (a routed
packet is filtered `in` on its input and `out` on its output interface); macOS has no IPv6
counterpart of check_interface. Persistence: the LaunchDaemon (LAUNCHD_PLIST) runs load.sh
at boot and every CHECK_INTERVAL seconds; load.sh changes nothing while PF holds what it
would load, and loads it again when anything (a `pfctl -f /etc/pf.conf` at boot) dropped it.
"""

from __future__ import annotations

import plistlib
from collections.abc import Iterable
from typing import Literal

from ksbpf.policy import Endpoint, IPNetwork, Policy, PortSpec, macos_conflict, validate_macos_user
from ksbpf.render import _guard
from ksbpf.render.base import Rendered, Unsupported
from ksbpf.verdict import DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER, DNS_PORTS, ND_ICMPV6_TYPES

ANCHOR = "ksbpf"
# A glob is expanded to this many units: utun0 .. utun31.
GLOB_UNITS = 32
STATE_DIR = "/var/run/ksbpf"
LOOPBACK = "lo0"
TUNNEL_MACRO = "ksbpf_tunnel"

# Where the LaunchDaemon finds load.sh (README: copy the rendered files there).
INSTALL_DIR = "/Library/Application Support/ksbpf"
LAUNCHD_LABEL = "org.ksbpf.pf"
LAUNCHD_PLIST = f"{LAUNCHD_LABEL}.plist"
CHECK_INTERVAL = 60

Direction = Literal["in", "out"]

# macOS's stock /etc/pf.conf (its comments left out): the main ruleset when no other is given.
STOCK_PF_CONF = """\
scrub-anchor "com.apple/*"
nat-anchor "com.apple/*"
rdr-anchor "com.apple/*"
dummynet-anchor "com.apple/*"
anchor "com.apple/*"
load anchor "com.apple" from "/etc/pf.anchors/com.apple"
"""
# The first word of a filter statement in pf.conf(5) (an include may hold one too).
_FILTER_WORDS = frozenset({"pass", "block", "anchor", "antispoof", "match", "include"})


# ------------------------------------------------------------------ refusing unsafe values


def _user(name: object, what: str) -> str:
    return _guard.subject(name, what, "a macOS user name or uid", validate_macos_user)


def main_ruleset(pf_conf: str | None = None) -> str:
    """The main ruleset while ksbpf is engaged: `pf_conf` (the system's /etc/pf.conf text;
    Apple's stock file when None) with ksbpf's options first and `anchor "ksbpf"` before
    its first filter statement. First among the filter rules: a `pass quick` in Apple's
    anchors or the user's rules would win if it ran before ksbpf's anchor."""
    text = STOCK_PF_CONF if pf_conf is None else pf_conf
    lines = text.splitlines()
    at = len(lines)
    continued = False
    for i, line in enumerate(lines):
        words = line.split("#", 1)[0].split()
        if not continued and words and words[0] in _FILTER_WORDS:
            at = i
            break
        continued = line.rstrip().endswith("\\")
    head = [
        "# ksbpf: the main ruleset while the kill switch is engaged: /etc/pf.conf (unchanged on",
        "# disk) with ksbpf's options on top and its anchor first among the filter rules.",
        "# rollback.sh and `ksctl down` load /etc/pf.conf again.",
        f"set skip on {LOOPBACK}",
        "set block-policy drop",
    ]
    return "\n".join([*head, *lines[:at], f'anchor "{ANCHOR}"', *lines[at:]]) + "\n"


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
    def __init__(self, policy: Policy) -> None:
        self.p = policy
        self.endpoint_user = policy.tunnel.macos_endpoint_user
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
            user = ex.macos_user
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


def _unsupported(policy: Policy) -> list[Unsupported]:
    out: list[Unsupported] = []
    for i, name in enumerate(policy.tunnel.interfaces):
        if name.endswith("*"):
            out.append(Unsupported(
                f"tunnel.interfaces[{i}]",
                f"macOS PF has no interface wildcards or groups; {name!r} is rendered as "
                f"{name[:-1]}0-{name[:-1]}{GLOB_UNITS - 1} and any other name it matches stays blocked",
            ))
    if policy.tunnel.endpoints and policy.tunnel.macos_endpoint_user is None:
        out.append(Unsupported(
            "tunnel.macos.endpoint_user",
            "not set: PF cannot see cgroups or socket marks, so every local process may reach the endpoints "
            "(name the tunnel client's user in [tunnel.macos] endpoint_user to restrict them)",
        ))
    for i, ex in enumerate(policy.exemptions):
        if ex.macos_user is None:
            out.append(Unsupported(
                f"exempt[{i}].macos.user",
                f"not set: exempt[{i}] ({ex.cgroup}) is not applied on macOS and its traffic outside the tunnel "
                "stays blocked (name the macOS user it stands for in [exempt.macos] user)",
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
        f'STATE="${{KSBPF_STATE_DIR:-{STATE_DIR}}}"\n'
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
        "# Engaged already, as this loaded it (the LaunchDaemon runs this every minute): PF\n"
        "# enabled, the main ruleset calls the anchor, and the anchor holds what was read back\n"
        "# after the last load of this same anchor. Then change nothing (no state flush).\n"
        'if [ -f "$STATE/token" ] && [ -f "$STATE/loaded.rules" ] && [ -f "$STATE/loaded.anchor" ] &&\n'
        '    cmp -s "$STATE/anchor.conf" "$STATE/loaded.anchor" &&\n'
        "    pfctl -s info 2>/dev/null | grep -q '^Status: Enabled' &&\n"
        f"    pfctl -s rules 2>/dev/null | grep -qx 'anchor \"{ANCHOR}\" all' &&\n"
        f'    [ "$(pfctl -a {ANCHOR} -s rules 2>/dev/null)" = "$(cat "$STATE/loaded.rules")" ]; then\n'
        "    exit 0\n"
        "fi\n"
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
        "# Read back what the kernel holds, and keep it for the check above and ksctl status.\n"
        "pfctl -s info | grep -q '^Status: Enabled' || { echo 'ksbpf: PF is not enabled' >&2; exit 1; }\n"
        f'pfctl -a {ANCHOR} -s rules > "$STATE/loaded.rules"\n'
        f"grep -q . \"$STATE/loaded.rules\" || {{ echo 'ksbpf: anchor {ANCHOR} is empty' >&2; exit 1; }}\n"
        'cp "$STATE/anchor.conf" "$STATE/loaded.anchor"\n'
        "echo 'ksbpf: PF kill switch engaged'\n"
    )


def _rollback_script() -> str:
    return (
        "#!/bin/sh\n"
        "# ksbpf: the emergency key. Removes the PF kill switch and restores the system's\n"
        "# PF configuration (as root). Every step runs even if one before it failed.\n"
        "# If PF still blocks afterwards, `pfctl -d` disables PF altogether.\n"
        "set -u\n"
        f'STATE="${{KSBPF_STATE_DIR:-{STATE_DIR}}}"\n'
        "rc=0\n"
        "# The LaunchDaemon first, or it engages the kill switch again within a minute.\n"
        f"launchctl bootout system/{LAUNCHD_LABEL} 2>/dev/null || true\n"
        "# The system's main ruleset next: after it nothing calls the anchor.\n"
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


def launchd_plist(install_dir: str = INSTALL_DIR) -> str:
    """The LaunchDaemon that runs load.sh at boot and every CHECK_INTERVAL seconds (load.sh
    changes nothing while PF holds its rules)."""
    data = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": ["/bin/sh", f"{install_dir}/load.sh"],
        "RunAtLoad": True,
        "StartInterval": CHECK_INTERVAL,
        "StandardOutPath": "/var/log/ksbpf.log",
        "StandardErrorPath": "/var/log/ksbpf.log",
    }
    return plistlib.dumps(data, sort_keys=True).decode("ascii").replace("\t", "  ")


def render_pf(policy: Policy, *, pf_conf: str | None = None) -> Rendered:
    """The PF rendering of `policy`: files `ksbpf.anchor` (the anchor's rules), `pf.conf`
    (the main ruleset: `pf_conf`, the system's /etc/pf.conf text, Apple's stock one when
    None, calling the anchor), `load.sh`, `rollback.sh` and the LaunchDaemon
    `org.ksbpf.pf.plist`. The subjects come from the policy: `[tunnel.macos] endpoint_user`
    and each exemption's `[exempt.macos] user`. Raises ValueError for any value it cannot
    render safely.
    """
    _guard.check_policy(policy)
    t = policy.tunnel
    if t.macos_endpoint_user is not None:
        _user(t.macos_endpoint_user, "tunnel.macos.endpoint_user")
    for i, ex in enumerate(policy.exemptions):
        if ex.macos_user is not None:
            _user(ex.macos_user, f"exempt[{i}].macos.user")
    # One user per grant: PF sees only the user, so a shared one would get both.
    conflict = macos_conflict(t, policy.exemptions)
    if conflict is not None:
        raise ValueError(f"refusing to render {conflict[0]}: {conflict[1]}")
    anchor = _Anchor(policy).text()
    main = main_ruleset(pf_conf)
    files = {
        "ksbpf.anchor": anchor,
        "pf.conf": main,
        "load.sh": _load_script(anchor, main),
        "rollback.sh": _rollback_script(),
        LAUNCHD_PLIST: launchd_plist(),
    }
    for name, text in files.items():
        _guard.printable(name, text)
    return Rendered("macos", files, tuple(_unsupported(policy)))
