"""The policy model: TOML -> validated, immutable `Policy`.

Every backend (nftables, routing, BPF, PF, Windows) is a pure function of a `Policy`.
Validation refuses anything a backend could not render safely, so renderers never see
quotes, newlines or shell metacharacters in names. Reading a policy file only root can
write (what ksbpfd and `ksctl up` apply) is ksbpf.policy_file's.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from ksbpf.errors import PolicyError
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, EXEMPT_MARK_BASE, EXEMPT_MARK_MASK, is_exempt_mark

_T = TypeVar("_T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Proto = Literal["tcp", "udp"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp")

DEFAULT_POLICY_PATH = Path("/etc/ksbpf/policy.toml")
DEFAULT_METRICS_LISTEN = "127.0.0.1:9477"

# Linux dev_valid_name() allows more, but every renderer (nft, PF, PowerShell) must be able
# to quote the name verbatim; a single trailing '*' is the only glob nft's oifname supports.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_IFGLOB_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,14}\*$")
# systemd unit and slice names (escaped with \x2d and friends) fit this set.
_CGROUP_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_.@:+\\-]{1,255}$")
_CGROUP_CANONICAL_RE = re.compile(r"[A-Za-z0-9_.@:+\\-]{1,255}(?:/[A-Za-z0-9_.@:+\\-]{1,255})*")
# The subjects of other platforms, in characters PF and PowerShell take verbatim inside
# quotes: a macOS user name or uid (PF `user`), a Windows service name, a program path
# under a drive or an %ENVVAR% root.
_MACOS_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10}")
_WINDOWS_SERVICE_RE = re.compile(r"[A-Za-z0-9_.$-]{1,256}")  # $: WireGuardTunnel$wg0, MSSQL$NAME
_WINDOWS_PROGRAM_RE = re.compile(r"(?:[A-Za-z]:|%[A-Za-z_][A-Za-z0-9_]*%)(?:\\[A-Za-z0-9 _.()+-]{1,255})+")


@dataclass(frozen=True, order=True)
class PortSpec:
    """A protocol and an inclusive port range: "tcp/22" or "udp/6000-6010"."""

    proto: Proto
    first: int
    last: int

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{self.proto}/{ports}"

    def covers(self, proto: str, port: int) -> bool:
        return proto == self.proto and self.first <= port <= self.last


@dataclass(frozen=True, order=True)
class Endpoint:
    """A VPN server reachable outside the tunnel: address, port, protocol."""

    address: IPAddress
    port: int
    proto: Proto

    @property
    def family(self) -> int:
        return self.address.version

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.proto}"


@dataclass(frozen=True)
class Tunnel:
    interfaces: tuple[str, ...]
    endpoints: tuple[Endpoint, ...] = ()
    endpoint_mark: int | None = None
    endpoint_cgroups: tuple[str, ...] = ()
    # The VPN client's process on the other platforms ([tunnel.macos], [tunnel.windows]);
    # the Linux engine reads none of them.
    macos_endpoint_user: str | None = None
    windows_endpoint_service: str | None = None
    windows_endpoint_program: str | None = None


@dataclass(frozen=True)
class Dns:
    servers: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class Lan:
    allow: bool = False
    networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Ipv6:
    mode: Literal["tunnel", "block"] = "tunnel"


@dataclass(frozen=True)
class BpfSettings:
    cgroup: str = "/"
    # A kernel header tree for BCC when the running kernel's headers are not installed.
    kernel_source: str | None = None


@dataclass(frozen=True)
class Metrics:
    host: str = "127.0.0.1"
    port: int = 9477
    # The `cgroup` label of BPF drop counters: "slice" (default; bounded however many scopes
    # come and go), "cgroup" (the whole path) or "none". See ksbpf.metrics.CgroupNames.
    cgroup_label: str = "slice"

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Exemption:
    """A cgroup (and its descendants) allowed outside the tunnel for exactly these ports.

    The cgroup is the exemption's name everywhere (run-time exemptions, duplicates,
    `ksctl unexempt`) and its subject on Linux; on macOS and Windows the subject is
    `macos_user` or `windows_service`/`windows_program` ([exempt.macos], [exempt.windows]),
    never derived from the cgroup. The Linux engine reads none of them."""

    cgroup: str
    allow: tuple[PortSpec, ...] = ()
    listen: tuple[PortSpec, ...] = ()
    to: tuple[IPNetwork, ...] = ()
    from_: tuple[IPNetwork, ...] = ()
    macos_user: str | None = None
    windows_service: str | None = None
    windows_program: str | None = None

    def to_networks(self, family: int) -> tuple[IPNetwork, ...]:
        return _networks_or_any(self.to, family)

    def from_networks(self, family: int) -> tuple[IPNetwork, ...]:
        return _networks_or_any(self.from_, family)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cgroup": self.cgroup}
        if self.allow:
            d["allow"] = [str(p) for p in self.allow]
        if self.listen:
            d["listen"] = [str(p) for p in self.listen]
        if self.to:
            d["to"] = [str(n) for n in self.to]
        if self.from_:
            d["from"] = [str(n) for n in self.from_]
        if self.macos_user is not None:
            d["macos"] = {"user": self.macos_user}
        windows = {k: v for k, v in (("service", self.windows_service), ("program", self.windows_program)) if v is not None}
        if windows:
            d["windows"] = windows
        return d


def _networks_or_any(nets: tuple[IPNetwork, ...], family: int) -> tuple[IPNetwork, ...]:
    if not nets:
        return (ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0"),)
    return tuple(n for n in nets if n.version == family)


@dataclass(frozen=True)
class Policy:
    tunnel: Tunnel
    dns: Dns = field(default_factory=Dns)
    lan: Lan = field(default_factory=Lan)
    ipv6: Ipv6 = field(default_factory=Ipv6)
    bpf: BpfSettings = field(default_factory=BpfSettings)
    metrics: Metrics = field(default_factory=Metrics)
    exemptions: tuple[Exemption, ...] = ()
    source: str = "<policy>"

    def with_exemptions(self, exemptions: tuple[Exemption, ...]) -> Policy:
        return replace(self, exemptions=exemptions)

    def lan_networks(self, family: int) -> tuple[IPNetwork, ...]:
        if not self.lan.allow:
            return ()
        return tuple(n for n in self.lan.networks if n.version == family)

    def dns_servers(self, family: int) -> tuple[IPAddress, ...]:
        return tuple(s for s in self.dns.servers if s.version == family)

    def endpoints(self, family: int) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.tunnel.endpoints if e.family == family)

    @property
    def endpoint_mark(self) -> int:
        """The mark endpoint traffic must carry (the policy's, or the one ksbpf's
        sock_create program gives the endpoint cgroups' sockets)."""
        return self.tunnel.endpoint_mark if self.tunnel.endpoint_mark is not None else DEFAULT_ENDPOINT_MARK


# --------------------------------------------------------------------------- parsing


class _Reader:
    """Walks one TOML table, remembering the key path for error messages."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str) -> None:
        self.data = data
        self.source = source
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, reason: str) -> PolicyError:
        return PolicyError(reason, source=self.source, key=self.key(name))

    def get(self, name: str, typ: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        # bool is an int in Python; a port or mark given as `true` is still wrong.
        if isinstance(value, bool) and typ is not bool and not (
            isinstance(typ, tuple) and bool in typ
        ):
            raise self.fail(name, f"expected {_typename(typ)}, got a boolean")
        if not isinstance(value, typ):
            raise self.fail(name, f"expected {_typename(typ)}, got {type(value).__name__}")
        return value

    def get_list(self, name: str, item: type) -> list[Any]:
        values = self.get(name, list, [])
        if item is not bool and set(map(type, values)) <= {item}:  # the common case, at C speed
            return list(values)
        for i, v in enumerate(values):
            if not isinstance(v, item) or isinstance(v, bool):
                raise self.fail(f"{name}[{i}]", f"expected {_typename(item)}, got {type(v).__name__}")
        return list(values)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _typename(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "a table"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def parse_port_spec(text: str) -> PortSpec:
    """'tcp/22' or 'udp/6000-6010' -> PortSpec; ValueError naming what is wrong."""
    proto, sep, ports = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not PROTO/PORT (e.g. tcp/22)")
    if proto not in PROTOS:
        raise ValueError(f"unknown protocol {proto!r} in {text!r} (tcp or udp)")
    first_s, dash, last_s = ports.partition("-")
    first = _parse_port(first_s, text)
    last = _parse_port(last_s, text) if dash else first
    if last < first:
        raise ValueError(f"port range {ports!r} is reversed")
    return PortSpec(proto, first, last)


def _parse_port(text: str, whole: str) -> int:
    # ASCII only: str.isdigit and int() also take "２２" or "٢٢", which no other tool reads as 22.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"bad port {text!r} in {whole!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {whole!r} is outside 1-65535")
    return port


def parse_endpoint(text: str) -> Endpoint:
    """'198.51.100.7:51820/udp' or '[2001:db8::7]:51820/udp' -> Endpoint."""
    hostport, sep, proto = text.rpartition("/")
    if not sep:
        raise ValueError(f"{text!r} is not ADDRESS:PORT/PROTO")
    if proto not in PROTOS:
        raise ValueError(f"unknown protocol {proto!r} in {text!r} (tcp or udp)")
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r}: IPv6 endpoints are written [ADDRESS]:PORT/PROTO")
        port_s = rest[1:]
    else:
        host, colon, port_s = hostport.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} has no port")
    address = parse_address(host)
    return Endpoint(address, _parse_port(port_s, text), proto)


def _no_zone(text: str) -> None:
    # ipaddress accepts any text after '%' as an IPv6 zone; no renderer may see it.
    if "%" in text:
        raise ValueError(f"{text!r}: IPv6 zone ids ('%...') are not supported")


def _ipv4_packed(text: str) -> bytes | None:
    """The 4 bytes of `text` if it is the one spelling ipaddress accepts for an IPv4
    address (dotted decimal, no leading zeros), else None: inet_aton is lax ("1", "0x1",
    "1.2.3.4 junk", leading zeros), but only a canonical text survives the round trip."""
    try:
        packed = socket.inet_aton(text)
    except (OSError, ValueError):  # ValueError: NUL or non-ASCII
        return None
    return packed if socket.inet_ntoa(packed) == text else None


def parse_network(text: str) -> IPNetwork:
    # Fast path, same result as ipaddress.ip_network: ADDRESS/PREFIX with a canonical IPv4
    # address, a decimal prefix <= 32 and no host bits. Anything else takes the slow path.
    addr, slash, prefix = text.partition("/")
    if slash and 0 < len(prefix) <= 2 and prefix.isascii() and prefix.isdigit():
        packed = _ipv4_packed(addr)
        plen = int(prefix)
        if packed is not None and plen <= 32:
            value = int.from_bytes(packed, "big")
            if value & ((1 << (32 - plen)) - 1) == 0:
                return ipaddress.IPv4Network((value, plen))
    _no_zone(text)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"bad network {text!r}: {e}") from None


def parse_address(text: str) -> IPAddress:
    packed = _ipv4_packed(text)
    if packed is not None:
        return ipaddress.IPv4Address(packed)
    _no_zone(text)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


# Words libnftables' JSON parser reads as an IP protocol wherever a string may stand, so a
# rule matching an interface of that name is refused whole ("datatype mismatch"); a leading
# "@" makes a set reference. Found by trying every /etc/protocols name against libnftables
# (tests/kernel/test_nft_names.py keeps this list honest).
NFT_JSON_PROTOCOL_WORDS = frozenset({"ah", "comp", "dccp", "esp", "icmp", "icmpv6", "sctp", "tcp", "udp", "udplite"})


def validate_interface(name: str) -> str:
    if _IFNAME_RE.fullmatch(name) or _IFGLOB_RE.fullmatch(name):
        if name in (".", ".."):
            raise ValueError(f"{name!r} is not a valid interface name")
        if name.startswith("@") or name in NFT_JSON_PROTOCOL_WORDS:
            raise ValueError(f"{name!r} cannot be matched as an interface name by nftables "
                             "(read as a set reference or a protocol); rename the interface")
        if name == "lo" or (name.endswith("*") and "lo".startswith(name[:-1])):
            raise ValueError(f"{name!r} would make loopback a tunnel interface")
        return name
    raise ValueError(
        f"{name!r} is not a valid interface name or glob "
        "(1-15 of A-Z a-z 0-9 _ . @ -, optionally ending in a single '*')"
    )


def normalize_cgroup(path: str) -> str:
    """Validate a cgroup path relative to the cgroup2 mount; '/' is the root.

    Returns the canonical form: no leading or trailing '/', '' for the root.
    """
    # Fast path: already canonical (non-empty components of the allowed characters).
    if type(path) is str and _CGROUP_CANONICAL_RE.fullmatch(path):
        if "." not in path:
            return path
        parts = path.split("/")
        if "." not in parts and ".." not in parts:
            return path
    if not isinstance(path, str) or "\x00" in path:
        raise ValueError("cgroup path must be a string without NUL")
    parts = [p for p in path.strip("/").split("/") if p]
    if path.strip("/") and len(parts) != len(path.strip("/").split("/")):
        raise ValueError(f"cgroup path {path!r} has an empty component")
    for part in parts:
        if part in (".", ".."):
            raise ValueError(f"cgroup path {path!r} may not contain '.' or '..'")
        if not _CGROUP_COMPONENT_RE.fullmatch(part):
            raise ValueError(f"cgroup path {path!r}: component {part!r} has characters outside A-Z a-z 0-9 _ . @ : + \\ -")
    return "/".join(parts)


def validate_macos_user(name: str) -> str:
    """A macOS user name or uid, as PF's `user` matches it."""
    if not _MACOS_USER_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a macOS user name or uid (a letter or _, then up to 31 of "
                         "A-Z a-z 0-9 _ . -; or a number)")
    return name


def validate_windows_service(name: str) -> str:
    """A Windows service name (the short name, e.g. W32Time), as a firewall rule's -Service."""
    if not _WINDOWS_SERVICE_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a Windows service name (1-256 of A-Z a-z 0-9 _ . $ -; "
                         "the service's short name, e.g. W32Time)")
    return name


def validate_windows_program(path: str) -> str:
    """A full program path, as a firewall rule's -Program."""
    parts = path.split("\\")[1:]
    if not _WINDOWS_PROGRAM_RE.fullmatch(path) or any(p.strip() in (".", "..") for p in parts):
        raise ValueError(f"{path!r} is not a full program path like C:\\Program Files\\App\\app.exe "
                         "(a drive or %ENVVAR%, then components of A-Z a-z 0-9 space _ . ( ) + -)")
    return path


def parse_mark(value: int | str) -> int:
    if isinstance(value, str) and not value.isascii():
        raise ValueError(f"mark {value!r} has characters outside ASCII")
    mark = int(value, 0) if isinstance(value, str) else value
    if not 1 <= mark <= 0xFFFFFFFF:
        raise ValueError(f"mark {value!r} is outside 1-0xffffffff")
    return mark


def _parse_listen(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r}: write IPv6 as [ADDRESS]:PORT")
        port_s = rest[1:]
    else:
        host, colon, port_s = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} is not HOST:PORT")
    parse_address(host)
    if not (port_s.isascii() and port_s.isdigit()) or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"bad port {port_s!r} in {text!r}")
    return host, int(port_s)


class _Memo(Generic[_T]):
    """A pure validator (text -> value or ValueError) remembering its successes, bounded by
    generations: after `rotate` only what was asked for since the previous rotate is kept."""

    __slots__ = ("fn", "new", "old")

    def __init__(self, fn: Callable[[str], _T]) -> None:
        self.fn = fn
        self.new: dict[str, _T] = {}
        self.old: dict[str, _T] = {}

    def get(self, text: str) -> _T:
        new = self.new
        if text in new:
            return new[text]
        old = self.old
        value = old[text] if text in old else self.fn(text)
        new[text] = value
        return value

    def rotate(self) -> None:
        self.old, self.new = self.new, {}


class _Validators:
    """The per-item validators a parse applies, plain or memoized (string -> value).
    Memoized, a value is computed once however often its string occurs (the 10,000
    "tcp/443" of a large policy) and, kept by a PolicyParser, across parses."""

    def __init__(self, memo: bool) -> None:
        fns: tuple[Callable[[str], Any], ...] = (
            validate_interface, parse_endpoint, parse_address, parse_network, normalize_cgroup, parse_port_spec,
        )
        self.memos = tuple(_Memo(fn) for fn in fns) if memo else ()
        calls = tuple(m.get for m in self.memos) if memo else fns
        self.interface: Callable[[str], str] = calls[0]
        self.endpoint: Callable[[str], Endpoint] = calls[1]
        self.address: Callable[[str], IPAddress] = calls[2]
        self.network: Callable[[str], IPNetwork] = calls[3]
        self.cgroup: Callable[[str], str] = calls[4]
        self.port_spec: Callable[[str], PortSpec] = calls[5]

    def rotate(self, after_failure: bool = False) -> None:
        """Forget what the previous generation used and was not used since. After a failed
        parse (which stopped early and so used only part of the policy), keep both
        generations unless that would let the memo grow past twice its last size."""
        for m in self.memos:
            if not after_failure or len(m.new) > 2 * len(m.old) + 1024:
                m.rotate()


_PLAIN = _Validators(memo=False)


def _convert(reader: _Reader, name: str, values: list[str], fn: Callable[[str], Any]) -> tuple[Any, ...]:
    try:
        return tuple(map(fn, values))
    except ValueError:
        for i, v in enumerate(values):  # again, to name the first bad item
            try:
                fn(v)
            except ValueError as e:
                raise reader.fail(f"{name}[{i}]", str(e)) from None
        raise


_EXEMPTION_KEYS = frozenset(("cgroup", "allow", "listen", "to", "from"))
_ABSENT: tuple[str, ...] = ()


def _exemption_fast(data: Mapping[str, Any], v: _Validators) -> Exemption | None:
    """The exemption in `data` if it is valid and plain (a str cgroup, lists of str), else
    None, and then `_exemption_checked` gives the result or the error: the same result
    with less work than a _Reader."""
    if not _EXEMPTION_KEYS.issuperset(data):
        return None
    cgroup = data.get("cgroup")
    allow_l = data.get("allow", _ABSENT)
    listen_l = data.get("listen", _ABSENT)
    to_l = data.get("to", _ABSENT)
    from_l = data.get("from", _ABSENT)
    if type(cgroup) is not str:
        return None
    for values in (allow_l, listen_l, to_l, from_l):
        if values is not _ABSENT:
            if type(values) is not list:
                return None
            for item in values:
                if type(item) is not str:
                    return None
    if (not allow_l and not listen_l) or (to_l and not allow_l) or (from_l and not listen_l):
        return None
    try:
        cgroup = v.cgroup(cgroup)
        allow = tuple(map(v.port_spec, allow_l)) if allow_l else ()
        listen = tuple(map(v.port_spec, listen_l)) if listen_l else ()
        to = tuple(map(v.network, to_l)) if to_l else ()
        from_ = tuple(map(v.network, from_l)) if from_l else ()
    except ValueError:
        return None
    if not cgroup:
        return None
    return Exemption(
        cgroup,
        allow if len(allow) <= 1 else tuple(sorted(set(allow))),
        listen if len(listen) <= 1 else tuple(sorted(set(listen))),
        to,
        from_,
    )


def _exemption_checked(data: Mapping[str, Any], source: str, prefix: str, v: _Validators) -> Exemption:
    r = _Reader(data, source, prefix)
    cgroup = r.get("cgroup", str)
    if cgroup is None:
        raise r.fail("cgroup", "is required")
    try:
        cgroup = v.cgroup(cgroup)
    except ValueError as e:
        raise r.fail("cgroup", str(e)) from None
    if not cgroup:
        raise r.fail("cgroup", "the root cgroup cannot be exempted (that would exempt everything)")
    allow = _convert(r, "allow", r.get_list("allow", str), v.port_spec)
    listen = _convert(r, "listen", r.get_list("listen", str), v.port_spec)
    to = _convert(r, "to", r.get_list("to", str), v.network)
    from_ = _convert(r, "from", r.get_list("from", str), v.network)
    macos = _platform_table(r, "macos", _EXEMPT_MACOS)
    windows = _platform_table(r, "windows", _EXEMPT_WINDOWS)
    r.finish()
    if not allow and not listen:
        raise r.fail("allow", "an exemption needs at least one 'allow' or 'listen' port")
    if to and not allow:
        raise r.fail("to", "'to' applies to 'allow' ports, and none are given")
    if from_ and not listen:
        raise r.fail("from", "'from' applies to 'listen' ports, and none are given")
    return Exemption(cgroup, tuple(sorted(set(allow))), tuple(sorted(set(listen))), to, from_,
                     macos.get("user"), windows.get("service"), windows.get("program"))


# The keys of the platform tables and their validators ([exempt.macos], [tunnel.windows], ...).
_EXEMPT_MACOS: dict[str, Callable[[str], str]] = {"user": validate_macos_user}
_EXEMPT_WINDOWS: dict[str, Callable[[str], str]] = {"service": validate_windows_service, "program": validate_windows_program}
_TUNNEL_MACOS: dict[str, Callable[[str], str]] = {"endpoint_user": validate_macos_user}
_TUNNEL_WINDOWS: dict[str, Callable[[str], str]] = {
    "endpoint_service": validate_windows_service, "endpoint_program": validate_windows_program}


def _platform_table(r: _Reader, name: str, keys: Mapping[str, Callable[[str], str]]) -> dict[str, str]:
    """The validated keys of the sub-table `name` of r's table ({} when it is absent)."""
    table = r.get(name, dict)
    if table is None:
        return {}
    sub = _Reader(table, r.source, r.key(name))
    out: dict[str, str] = {}
    for key, fn in keys.items():
        value = sub.get(key, str)
        if value is not None:
            try:
                out[key] = fn(value)
            except ValueError as e:
                raise sub.fail(key, str(e)) from None
    sub.finish()
    if not out:
        raise r.fail(name, f"names nothing: give {' or '.join(keys)}")
    return out


def subject_conflict(tunnel: Tunnel, exemptions: tuple[Exemption, ...] | list[Exemption]) -> tuple[str, str] | None:
    """(key, reason) when two grants share a platform subject, else None. PF and the Windows
    firewall see only the subject: a user (or service, program) standing for two
    exemptions, or for one and the VPN client, would get both grants. On Windows a subject
    that names fewer conditions covers one naming more (program P covers P + service S)."""
    return macos_conflict(tunnel, exemptions) or windows_conflict(tunnel, exemptions)


def macos_conflict(tunnel: Tunnel, exemptions: tuple[Exemption, ...] | list[Exemption]) -> tuple[str, str] | None:
    mac: dict[str, str] = {}
    if tunnel.macos_endpoint_user is not None:
        mac[tunnel.macos_endpoint_user] = "tunnel.macos.endpoint_user"
    for i, ex in enumerate(exemptions):
        if ex.macos_user is not None:
            other = mac.get(ex.macos_user)
            if other is not None:
                return f"exempt[{i}].macos.user", f"user {ex.macos_user} already stands for {other}"
            mac[ex.macos_user] = f"exempt[{i}]"
    return None


def windows_conflict(tunnel: Tunnel, exemptions: tuple[Exemption, ...] | list[Exemption]) -> tuple[str, str] | None:
    # (service, program) in lower case ("" for absent) -> who, and how the policy spells it
    win: dict[tuple[str, str], tuple[str, str]] = {}
    t = tunnel
    if t.windows_endpoint_service is not None or t.windows_endpoint_program is not None:
        win[((t.windows_endpoint_service or "").lower(), (t.windows_endpoint_program or "").lower())] = (
            "tunnel.windows", " and ".join(x for x in (t.windows_endpoint_service, t.windows_endpoint_program) if x))
    for i, ex in enumerate(exemptions):
        if ex.windows_service is not None or ex.windows_program is not None:
            key = ((ex.windows_service or "").lower(), (ex.windows_program or "").lower())
            spelled = " and ".join(x for x in (ex.windows_service, ex.windows_program) if x)
            if key in win:
                return f"exempt[{i}].windows", f"{spelled} already stands for {win[key][0]}"
            win[key] = (f"exempt[{i}]", spelled)
    # Covering: a subject with one part blank matches every subject sharing the other part.
    for (svc, prog), (who, spelled) in win.items():
        if svc and prog:
            for cover in ((svc, ""), ("", prog)):
                if cover in win:
                    return (who if who == "tunnel.windows" else f"{who}.windows",
                            f"{who} ({spelled}) is also matched by {win[cover][0]} ({win[cover][1]}): "
                            "the firewall could not keep their grants apart")
    return None


def parse_exemption(data: Mapping[str, Any], source: str, prefix: str) -> Exemption:
    return _exemption_fast(data, _PLAIN) or _exemption_checked(data, source, prefix, _PLAIN)


def parse_policy(data: Mapping[str, Any], source: str = "<policy>") -> Policy:
    return _parse_policy(data, source, _Validators(memo=True))


def _parse_policy(data: Mapping[str, Any], source: str, v: _Validators) -> Policy:
    top = _Reader(data, source, "")
    tunnel_t = top.get("tunnel", dict)
    if tunnel_t is None:
        raise top.fail("tunnel", "is required")
    t = _Reader(tunnel_t, source, "tunnel")
    interfaces = _convert(t, "interfaces", t.get_list("interfaces", str), v.interface)
    if not interfaces:
        raise t.fail("interfaces", "at least one tunnel interface is required")
    endpoints = _convert(t, "endpoints", t.get_list("endpoints", str), v.endpoint)
    mark_v = t.get("endpoint_mark", (int, str))
    mark = None
    if mark_v is not None:
        try:
            mark = parse_mark(mark_v)
        except ValueError as e:
            raise t.fail("endpoint_mark", str(e)) from None
    ep_cgroups = _convert(t, "endpoint_cgroups", t.get_list("endpoint_cgroups", str), v.cgroup)
    macos = _platform_table(t, "macos", _TUNNEL_MACOS)
    windows = _platform_table(t, "windows", _TUNNEL_WINDOWS)
    t.finish()
    if "" in ep_cgroups:
        # Every socket lives below the root: all of them would pass the endpoint check.
        raise t.fail("endpoint_cgroups", "the root cgroup ('/') would let every process reach the endpoints; "
                     "name the VPN client's own cgroup")
    if mark is not None and is_exempt_mark(mark):
        raise t.fail("endpoint_mark", f"{mark:#x} lies in the range ksbpf reserves for exemptions ({EXEMPT_MARK_BASE:#x}/{EXEMPT_MARK_MASK:#x})")
    if endpoints and mark is None and not ep_cgroups:
        raise t.fail("endpoints", "endpoints need endpoint_mark, endpoint_cgroups, or both")
    tunnel = Tunnel(interfaces, endpoints, mark, ep_cgroups, macos.get("endpoint_user"),
                    windows.get("endpoint_service"), windows.get("endpoint_program"))

    dns_r = _Reader(top.get("dns", dict, {}), source, "dns")
    dns = Dns(_convert(dns_r, "servers", dns_r.get_list("servers", str), v.address))
    dns_r.finish()

    lan_r = _Reader(top.get("lan", dict, {}), source, "lan")
    lan = Lan(
        bool(lan_r.get("allow", bool, False)),
        _convert(lan_r, "networks", lan_r.get_list("networks", str), v.network),
    )
    lan_r.finish()
    for net in lan.networks:
        if net.prefixlen == 0:  # "LAN" = the whole address family: the kill switch would be off
            raise lan_r.fail("networks", f"{net} covers every IPv{net.version} address, not a local network")

    v6_r = _Reader(top.get("ipv6", dict, {}), source, "ipv6")
    mode = v6_r.get("mode", str, "tunnel")
    if mode not in ("tunnel", "block"):
        raise v6_r.fail("mode", f"must be 'tunnel' or 'block', not {mode!r}")
    v6_r.finish()

    bpf_r = _Reader(top.get("bpf", dict, {}), source, "bpf")
    cg = bpf_r.get("cgroup", str, "/")
    try:
        cg = v.cgroup(cg)
    except ValueError as e:
        raise bpf_r.fail("cgroup", str(e)) from None
    ksrc = bpf_r.get("kernel_source", str)
    bpf_r.finish()

    m_r = _Reader(top.get("metrics", dict, {}), source, "metrics")
    listen = m_r.get("listen", str, DEFAULT_METRICS_LISTEN)
    try:
        host, port = _parse_listen(listen)
    except ValueError as e:
        raise m_r.fail("listen", str(e)) from None
    public = m_r.get("listen_public", bool, False)
    cgroup_label = m_r.get("cgroup_label", str, "slice")
    m_r.finish()
    if cgroup_label not in ("cgroup", "slice", "none"):
        raise m_r.fail("cgroup_label", f"must be 'cgroup', 'slice' or 'none', not {cgroup_label!r}")
    if not ipaddress.ip_address(host).is_loopback and not public:
        # The input chain accepts the tunnel and (when allowed) the LAN: a wildcard or LAN
        # address would serve the metrics there too. Only when the admin says so.
        raise m_r.fail("listen", f"{listen!r} is not a loopback address; set listen_public = true "
                       "to serve metrics beyond this machine")

    ex_list = top.get("exempt", list, [])
    exemptions = []
    seen: set[str] = set()
    for i, ex in enumerate(ex_list):
        if not isinstance(ex, dict):
            raise top.fail(f"exempt[{i}]", "expected a table ([[exempt]])")
        exemption = _exemption_fast(ex, v) or _exemption_checked(ex, source, f"exempt[{i}]", v)
        if exemption.cgroup in seen:
            raise top.fail(f"exempt[{i}].cgroup", f"{exemption.cgroup!r} is exempted twice")
        seen.add(exemption.cgroup)
        exemptions.append(exemption)
    top.finish()
    conflict = subject_conflict(tunnel, exemptions)
    if conflict is not None:
        raise PolicyError(conflict[1], source=source, key=conflict[0])

    return Policy(
        tunnel=tunnel,
        dns=dns,
        lan=lan,
        ipv6=Ipv6(mode),
        bpf=BpfSettings(cg or "/", ksrc),
        metrics=Metrics(host, port, cgroup_label),
        exemptions=tuple(exemptions),
        source=source,
    )


def loads_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"TOML syntax error: {e}", source=source) from None
    except RecursionError:  # tomllib's recursive descent gives up on "a = [[[[...": bad input
        raise PolicyError("TOML nested too deeply", source=source) from None
    return parse_policy(data, source)


# ------------------------------------------------------------------ incremental parsing

# Why parsing a policy chunk by chunk gives what parsing it whole gives.
#
# The text is cut before every line whose first non-blank character is '[': every table
# header, and also any such line inside a multi-line string or array. A cut inside a
# multi-line string or array leaves the chunk before it unterminated, so that chunk fails
# to parse alone. Parsing is left to right and where a statement starts does not depend on
# the tables defined so far, so by induction from the start of the text: if every chunk
# parses alone, every cut lies between two statements and each chunk alone means what it
# means in the whole text. Then:
# - a chunk under an `[[exempt]]` header appends exactly its one table to `exempt`, as long
#   as no other chunk defines anything under `exempt` (a static `exempt = [...]`,
#   `[exempt.x]`, `[[exempt.allow]]`, `["exempt"]`: those chunks have an "exempt" key);
# - the other chunks with disjoint top-level keys cannot see each other's tables, so their
#   union is the whole text minus `exempt`; if their keys overlap (`[a]` then `[a.b]`, a
#   table defined twice), they are parsed together as one text, which is sound now that
#   the cuts are known to lie between statements.
# Only "\n" ends a line, as in TOML (re's ^ under MULTILINE), so "\r\n" is never cut.
# A chunk under `[exempt.macos]` or `[exempt.windows]` is joined to the chunk before it when
# that one is an `[[exempt]]` chunk (joined with it, the sub-table belongs to that
# exemption, as in the whole text); dropping a cut leaves the argument above intact.
# Exemptions are validated one by one and checked for duplicate cgroups and shared platform
# subjects over the merged list, as parse_policy does. Anything unusual, and any error at all, goes to the full
# path (loads_policy), so every PolicyError, exempt[i] index included, is the full path's.

_CUT_RE = re.compile(r"^(?=[ \t]*\[)", re.MULTILINE)
_EXEMPT_HEADER_RE = re.compile(r"[ \t]*\[\[[ \t]*exempt[ \t]*\]\]")
_EXEMPT_PLATFORM_RE = re.compile(r"[ \t]*\[[ \t]*exempt[ \t]*\.[ \t]*(?:macos|windows)[ \t]*\]")


def _chunks(text: str) -> list[str]:
    out: list[str] = []
    for chunk in _CUT_RE.split(text):
        if out and _EXEMPT_PLATFORM_RE.match(chunk) and _EXEMPT_HEADER_RE.match(out[-1]):
            out[-1] += chunk
        elif chunk:
            out.append(chunk)
    return out

# A parsed chunk: the Exemption of an [[exempt]] chunk, the TOML of any other, None if
# it does not parse alone, is not valid, or is unusual (the full path must decide).
_Chunk = Exemption | dict[str, Any] | None


class PolicyParser:
    """`loads_policy` for a long-lived reader of one policy (the daemon, reloading its file):
    `loads` returns the same Policy, or raises the same PolicyError, but parses and
    validates again only the parts of the text that changed since the previous call or two.

    Keep one instance per policy file for the life of the process (it is not thread-safe)
    and give it every text read from that file, e.g. ksbpfd's reload:
    `self.parser = PolicyParser()` once, then `self.parser.loads(text, str(path))`.
    It holds the parsed chunks of the last two calls and the validated items of the last
    two validations, so it stays about the size of two parsed policies.
    """

    def __init__(self) -> None:
        self._chunks: dict[str, _Chunk] = {}  # chunk text -> parsed, of the last call
        self._older_chunks: dict[str, _Chunk] = {}  # of the call before
        self._rest: tuple[tuple[str, ...], Policy] | None = None  # non-exempt chunks -> Policy
        self._rest_validators = _Validators(memo=True)
        self._rest_failed = False
        self._exempt_validators = _Validators(memo=True)

    def loads(self, text: str, source: str = "<policy>") -> Policy:
        policy = self._loads_chunked(text, source) if type(text) is str else None
        return loads_policy(text, source) if policy is None else policy

    def _loads_chunked(self, text: str, source: str) -> Policy | None:
        newer, older = self._chunks, self._older_chunks
        seen: dict[str, _Chunk] = {}
        self._exempt_validators.rotate()
        exemptions: list[Exemption] = []
        rest_texts: list[str] = []
        rest_data: list[dict[str, Any]] = []
        ok = True
        # Every chunk is looked up even after a bad one, so that the cache keeps them all.
        for chunk in _chunks(text):
            if chunk in seen:
                got = seen[chunk]
            else:
                if chunk in newer:
                    got = newer[chunk]
                elif chunk in older:
                    got = older[chunk]
                else:
                    got = self._parse_chunk(chunk)
                seen[chunk] = got
            if isinstance(got, Exemption):
                exemptions.append(got)
            elif got is None:
                ok = False
            else:
                rest_texts.append(chunk)
                rest_data.append(got)
        self._older_chunks, self._chunks = newer, seen
        if not ok or len({e.cgroup for e in exemptions}) != len(exemptions):
            return None
        key = tuple(rest_texts)
        if self._rest is not None and self._rest[0] == key:
            base = self._rest[1]
        else:
            merged = self._merge(rest_texts, rest_data)
            if merged is None:
                return None
            self._rest_validators.rotate(after_failure=self._rest_failed)
            self._rest_failed = True
            try:
                base = _parse_policy(merged, source, self._rest_validators)
            except Exception:  # the full path raises it again, or the right PolicyError
                return None
            self._rest_failed = False
            self._rest = (key, base)
        if subject_conflict(base.tunnel, exemptions) is not None:
            return None
        return replace(base, exemptions=tuple(exemptions), source=source)

    @staticmethod
    def _merge(texts: list[str], parsed: list[dict[str, Any]]) -> dict[str, Any] | None:
        merged: dict[str, Any] = {}
        for data in parsed:
            if not merged.keys().isdisjoint(data):
                try:
                    merged = tomllib.loads("".join(texts))
                except Exception:
                    return None
                break
            merged.update(data)
        return None if "exempt" in merged else merged

    def _parse_chunk(self, chunk: str) -> _Chunk:
        try:
            data = tomllib.loads(chunk)
        except Exception:
            return None
        if _EXEMPT_HEADER_RE.match(chunk) is None:
            return None if "exempt" in data else data
        tables = data.get("exempt")
        if len(data) != 1 or type(tables) is not list or len(tables) != 1 or type(tables[0]) is not dict:
            return None
        v = self._exempt_validators
        try:
            return _exemption_fast(tables[0], v) or _exemption_checked(tables[0], "", "", v)
        except Exception:
            return None


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"cannot read: {e.strerror}", source=str(p)) from None
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text", source=str(p)) from None
    return loads_policy(text, str(p))


def merge_exemptions(policy: Policy, runtime: tuple[Exemption, ...]) -> Policy:
    """The policy's own [[exempt]] plus run-time ones; a run-time entry for the same
    cgroup replaces the file's."""
    by_cgroup = {e.cgroup: e for e in policy.exemptions}
    for e in runtime:
        by_cgroup[e.cgroup] = e
    return policy.with_exemptions(tuple(by_cgroup[k] for k in sorted(by_cgroup)))

