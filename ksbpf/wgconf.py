"""A wg-quick configuration (/etc/wireguard/wg0.conf) read the way wg-quick and wg read
it, and the commented starting policy `ksctl init --from-wireguard` prints from it.

Pure: text in, text out. Resolving a hostname Endpoint is the caller's (a `resolve`
function given in); without one, hostnames are refused. No key (PrivateKey, PublicKey,
PresharedKey) is ever kept, printed or quoted in an error: only the values of the keys read
below are.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ksbpf.errors import PolicyError
from ksbpf.marks import is_exempt_mark
from ksbpf.policy import IPAddress, parse_address, validate_interface

# wg-quick: "The config file must be a valid interface name, followed by .conf"
_CONF_NAME = re.compile(r"(?:^|/)([a-zA-Z0-9_=+.-]{1,15})\.conf$")
# wg-quick's own test of a DNS= entry: an address if it is digits and dots or has a colon
_LOOKS_LIKE_IP = re.compile(r"^[0-9.]+$|:")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
# wg-quick's table number when no FwMark is set, also the fwmark it then gives wg: 51820,
# or the next free table number if that one is taken.
WG_QUICK_DEFAULT_FWMARK = 51820
Resolver = Callable[[str, int], Sequence[IPAddress]]


class WireGuardConfigError(PolicyError):
    """The wg-quick file is malformed or cannot be turned into a policy: exit 2."""


@dataclass(frozen=True)
class WgEndpoint:
    host: str  # an address or a hostname, as written (without brackets)
    port: int
    line: int
    address: IPAddress | None = None  # None: a hostname


@dataclass(frozen=True)
class WgPeer:
    number: int  # 1-based, in file order: peers are named by number and line, never by key
    line: int
    endpoint: WgEndpoint | None = None
    default_route: bool = False  # AllowedIPs holds 0.0.0.0/0 or ::/0

    @property
    def name(self) -> str:
        return f"peer {self.number} (line {self.line})"


@dataclass(frozen=True)
class WgQuickConfig:
    source: str
    interface: str
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    dns_servers: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    dns_line: int = 0
    fwmark: int | None = None  # FwMark =, None when absent or "off"
    fwmark_line: int = 0
    table: str | None = None
    peers: tuple[WgPeer, ...] = field(default_factory=tuple)

    @property
    def has_ipv6(self) -> bool:
        return any(a.version == 6 for a in self.addresses)

    @property
    def effective_fwmark(self) -> int:
        return self.fwmark if self.fwmark is not None else WG_QUICK_DEFAULT_FWMARK

    @property
    def wg_quick_sets_fwmark(self) -> bool:
        """Does WireGuard's own traffic carry the mark? FwMark = does; otherwise wg-quick
        sets one only when it installs a default route (a peer with AllowedIPs /0 and
        Table not off)."""
        if self.fwmark is not None:
            return True
        return (self.table or "auto").lower() == "auto" and any(p.default_route for p in self.peers)


def interface_from_path(path: str) -> str:
    """wg-quick names the interface after its file: /etc/wireguard/wg0.conf -> wg0."""
    m = _CONF_NAME.search(path)
    if not m:
        raise WireGuardConfigError("wg-quick needs the file to be named INTERFACE.conf (1-15 of A-Z a-z 0-9 _ = + . -)",
                                   source=path)
    name = m.group(1)
    try:
        return validate_interface(name)
    except ValueError as e:
        raise WireGuardConfigError(f"interface {name!r} (from the file name): {e}", source=path) from None


def _fail(source: str, line: int, key: str, reason: str) -> WireGuardConfigError:
    return WireGuardConfigError(reason, source=f"{source}:{line}", key=key)


def _parse_fwmark(value: str) -> int | None:
    """wg's parse_fwmark: "off", decimal, or 0x hex."""
    if value.lower() == "off":
        return None
    if not value.isascii() or not value[:1].isdigit():
        raise ValueError(f"{value!r} is not a number or 'off'")
    base = 16 if len(value) > 2 and value[:2].lower() == "0x" else 10
    try:
        mark = int(value, base)
    except ValueError:
        raise ValueError(f"{value!r} is not a number or 'off'") from None
    if mark > 0xFFFFFFFF:
        raise ValueError(f"{value!r} is larger than 32 bits")
    return mark or None


def _parse_endpoint(value: str, line: int) -> WgEndpoint:
    """wg's parse_endpoint: [V6]:PORT, or HOST:PORT split at the last colon."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":") or not rest[1:]:
            raise ValueError(f"{value!r}: an IPv6 endpoint is written [ADDRESS]:PORT")
        port_s = rest[1:]
    else:
        host, colon, port_s = value.rpartition(":")
        if not colon or not host or not port_s:
            raise ValueError(f"{value!r} is not HOST:PORT")
    if not (port_s.isascii() and port_s.isdigit()) or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"bad port {port_s!r} in {value!r} (1-65535)")
    try:
        address: IPAddress | None = parse_address(host)
    except ValueError:
        if ":" in host or not _HOSTNAME.fullmatch(host) or re.fullmatch(r"[0-9.]+", host):
            raise ValueError(f"{value!r}: {host!r} is neither an IP address nor a host name") from None
        address = None
    return WgEndpoint(host, int(port_s), line, address)


def _default_route(value: str) -> bool:
    for item in value.replace(",", " ").split():
        try:
            if ipaddress.ip_network(item, strict=False).prefixlen == 0:
                return True
        except ValueError:
            continue  # wg reports bad AllowedIPs itself; a policy does not need them
    return False


def parse_wg_quick(text: str, source: str, interface: str) -> WgQuickConfig:
    """Parse a wg-quick file as wg-quick does: keys case-insensitive, '#' starts a comment,
    sections [Interface] and [Peer]. Only the keys a policy needs are kept."""
    section = ""
    seen_interface = False
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    servers: list[IPAddress] = []
    search: list[str] = []
    dns_line = 0
    fwmark: int | None = None
    fwmark_line = 0
    table: str | None = None
    peers: list[WgPeer] = []
    peer: dict[str, object] | None = None

    def close_peer() -> None:
        if peer is not None:
            peers.append(WgPeer(**peer))  # type: ignore[arg-type]

    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.split("#", 1)[0].strip()
        if not stripped:
            continue
        if stripped.startswith("["):
            name = stripped.lower()
            if name == "[interface]":
                if seen_interface:
                    raise _fail(source, n, "[Interface]", "a second [Interface] section")
                seen_interface = True
                close_peer()
                peer = None
            elif name == "[peer]":
                close_peer()
                peer = {"number": len(peers) + 1, "line": n}
            else:
                # Only the section's name: a malformed line may hold a key.
                raise _fail(source, n, "section", "not [Interface] or [Peer]")
            section = name
            continue
        key, eq, value = stripped.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key.isascii() or not key.isalpha():
            # Never echo the line: it may be a key written without its '='.
            raise _fail(source, n, "line", "not KEY = VALUE")
        lkey = key.lower()
        if not section:
            raise _fail(source, n, key if lkey in _KNOWN_KEYS else "line", "outside [Interface] and [Peer]")
        try:
            if section == "[interface]":
                if lkey == "address":
                    for item in value.replace(",", " ").split():
                        if "%" in item:
                            raise ValueError(f"{item!r}: IPv6 zone ids are not supported")
                        addresses.append(ipaddress.ip_interface(item))
                elif lkey == "dns":
                    dns_line = n
                    for item in value.replace(",", " ").split():
                        if _LOOKS_LIKE_IP.search(item):
                            servers.append(parse_address(item))
                        else:
                            search.append(item)
                elif lkey == "fwmark":
                    fwmark, fwmark_line = _parse_fwmark(value), n
                elif lkey == "table":
                    table = value
            elif peer is not None:
                if lkey == "endpoint":
                    peer["endpoint"] = _parse_endpoint(value, n)
                elif lkey == "allowedips":
                    peer["default_route"] = bool(peer.get("default_route")) or _default_route(value)
        except ValueError as e:
            raise _fail(source, n, key, str(e)) from None
    close_peer()
    if not seen_interface:
        raise WireGuardConfigError("no [Interface] section: not a wg-quick configuration", source=source)
    if fwmark is not None and is_exempt_mark(fwmark):
        raise _fail(source, fwmark_line, "FwMark", f"{fwmark:#x} lies in the mark range ksbpf reserves for its "
                    "exemptions (0x4b000000/0xff000000): choose another FwMark")
    return WgQuickConfig(source, interface, tuple(addresses), tuple(dict.fromkeys(servers)), tuple(search), dns_line,
                         fwmark, fwmark_line, table, tuple(peers))


_KNOWN_KEYS = {"address", "dns", "fwmark", "table", "endpoint", "allowedips", "listenport", "mtu"}


@dataclass(frozen=True)
class PolicyDraft:
    text: str
    warnings: tuple[str, ...]


def _comment(text: str) -> str:
    """Free text (a path, a search domain) made safe for a TOML comment: printable ASCII."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _endpoint_text(address: IPAddress, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}/udp"


def resolve_endpoints(conf: WgQuickConfig, resolve: Resolver | None) -> list[tuple[WgPeer, tuple[IPAddress, ...]]]:
    """Every peer with an Endpoint and its addresses (a hostname's, from `resolve`)."""
    out: list[tuple[WgPeer, tuple[IPAddress, ...]]] = []
    for p in conf.peers:
        ep = p.endpoint
        if ep is None:
            continue
        if ep.address is not None:
            out.append((p, (ep.address,)))
            continue
        where = f"{conf.source}:{ep.line}"
        if resolve is None:
            raise WireGuardConfigError(f"{p.name}: {ep.host} is a host name and --no-resolve refuses host names; "
                                       "write the server's IP address in the file, or drop --no-resolve",
                                       source=where, key="Endpoint")
        try:
            addresses = tuple(dict.fromkeys(resolve(ep.host, ep.port)))
        except (OSError, ValueError) as e:
            raise WireGuardConfigError(f"{p.name}: cannot resolve host {ep.host}: {e}; write the server's IP "
                                       "address, or run init where the name resolves", source=where,
                                       key="Endpoint") from None
        if not addresses:
            raise WireGuardConfigError(f"{p.name}: host {ep.host} has no address", source=where, key="Endpoint")
        out.append((p, addresses))
    return out


def render_policy(conf: WgQuickConfig, resolve: Resolver | None = None) -> PolicyDraft:
    """A commented starting policy (TOML) for `conf`'s tunnel. What a WireGuard config
    cannot tell (exemptions, the LAN) is left as comments."""
    resolved = resolve_endpoints(conf, resolve)
    warnings: list[str] = []
    L: list[str] = [
        f"# ksbpf policy drafted by `ksctl init --from-wireguard {_comment(conf.source)}`.",
        "# Review it, fill in what a WireGuard file cannot tell (exemptions, LAN), then:",
        "#   ksctl check --config /etc/ksbpf/policy.toml",
        "# No key of the WireGuard file is copied here.",
        "",
        "[tunnel]",
        "# wg-quick names the interface after its file",
        f'interfaces = ["{conf.interface}"]',
    ]
    if resolved:
        L.append("# every [Peer]'s Endpoint: the only destinations reachable outside the tunnel")
        L.append("endpoints = [")
        seen: set[str] = set()
        for peer, addresses in resolved:
            ep = peer.endpoint
            assert ep is not None
            for addr in addresses:
                text = _endpoint_text(addr, ep.port)
                if text in seen:
                    continue
                seen.add(text)
                note = peer.name if ep.address is not None else f"{peer.name}: {ep.host} as resolved now"
                L.append(f'  "{text}",  # {note}')
        L.append("]")
        if any(ep.address is None for p, _ in resolved if (ep := p.endpoint) is not None):
            L.append("# A host name is resolved by wg-quick when it starts, and may change: with the kill switch")
            L.append("# engaged that lookup needs a resolver it can reach; an IP address in the file is safer.")
    else:
        L.append("# no [Peer] has an Endpoint: this side only answers peers that reach it (write their")
        L.append("# addresses here if it also connects out)")
        L.append("endpoints = []")
    if conf.fwmark is not None:
        L.append(f"# only packets with this fwmark may reach the endpoints: FwMark = {conf.fwmark:#x} (line {conf.fwmark_line})")
    else:
        L.append(f"# only packets with this fwmark may reach the endpoints: wg-quick's default ({WG_QUICK_DEFAULT_FWMARK},")
        L.append("# its routing table number; the next free number if that table is taken: check `wg show "
                 f"{conf.interface} fwmark`)")
    if not conf.wg_quick_sets_fwmark:
        detail = ("no FwMark is set and wg-quick sets none itself (no peer's AllowedIPs is a default route, "
                  "or Table is not auto): WireGuard's packets would carry no mark and be dropped; add "
                  f"`FwMark = {conf.effective_fwmark:#x}` to [Interface]")
        warnings.append(f"{conf.source}: {detail}")
        L.append(f"# WARNING: {detail}")
    L.append(f"endpoint_mark = {conf.effective_fwmark:#x}")
    L.append("")
    L.append("[dns]")
    if conf.dns_servers:
        L.append(f"# DNS = of [Interface] (line {conf.dns_line}): port 53/853 goes only to these, through the tunnel")
        if conf.dns_search:
            L.append(f"# (search domains ignored: {_comment(' '.join(conf.dns_search))})")
        L.append("servers = [" + ", ".join(f'"{s}"' for s in conf.dns_servers) + "]")
    else:
        L.append("# no DNS = in [Interface]: name the resolvers inside the tunnel, or DNS is dropped everywhere")
        if conf.dns_search:
            L.append(f"# (search domains ignored: {_comment(' '.join(conf.dns_search))})")
        L.append("servers = []")
    L += [
        "",
        "[lan]",
        "# Local network access stays blocked (TunnelCrack LocalNet). To allow some of it:",
        "# allow = true",
        '# networks = ["192.168.1.0/24"]',
        "allow = false",
        "",
        "[ipv6]",
    ]
    if conf.has_ipv6:
        L.append("# Address holds an IPv6 address: IPv6 goes through the tunnel only")
        L.append('mode = "tunnel"')
    else:
        L.append("# Address holds no IPv6 address: IPv6 is blocked (it could only leak)")
        L.append('mode = "block"')
    L += [
        "",
        "# Exemptions: what may bypass the tunnel, by cgroup. Keep your admin access reachable,",
        "# at boot too (the boot lockdown opens the listen ports below), for example:",
        "#",
        "# [[exempt]]",
        '# cgroup = "system.slice/ssh.service"',
        '# listen = ["tcp/22"]',
        '# from = ["192.168.1.0/24"]',
        "#",
        "# [[exempt]]",
        '# cgroup = "system.slice/systemd-timesyncd.service"',
        '# allow = ["udp/123"]',
    ]
    return PolicyDraft("\n".join(L) + "\n", tuple(warnings))
