"""Checks the PF and Windows renderers run on every value before it reaches their text.

Policy validation already refuses quotes, newlines and shell metacharacters, but a
renderer must not trust that its `Policy` came through it: tests and callers build Policy
objects by hand, and a check that only runs at parse time is one refactor away from not
running at all. Everything here raises ValueError; nothing escapes, everything refuses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from ksbpf.policy import PROTOS, Endpoint, Exemption, IPAddress, IPNetwork, Policy, PortSpec

# fullmatch everywhere: with re.match, `$` also matches before a trailing newline.
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
_IFGLOB = re.compile(r"[A-Za-z0-9_.@-]{1,14}\*")
_CGROUP_PART = re.compile(r"[A-Za-z0-9_.@:+\\-]{1,255}")


def interface(name: object) -> str:
    if not isinstance(name, str) or name in (".", "..") or not (_IFNAME.fullmatch(name) or _IFGLOB.fullmatch(name)):
        raise ValueError(f"refusing to render interface name {name!r}: 1-15 of A-Z a-z 0-9 _ . @ -, optionally ending in '*'")
    return name


def cgroup(path: object, what: str) -> str:
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(p in (".", "..") or not _CGROUP_PART.fullmatch(p) for p in parts):
        raise ValueError(f"refusing to render {what} {path!r}: not a cgroup path (A-Z a-z 0-9 _ . @ : + \\ - between slashes)")
    assert isinstance(path, str)
    return path


def address(a: object) -> IPAddress:
    if not isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address):
        raise ValueError(f"refusing to render {a!r}: not an IP address")
    if isinstance(a, ipaddress.IPv6Address) and a.scope_id is not None:
        raise ValueError(f"refusing to render {a!r}: a scoped IPv6 address (%zone) has no place in a ruleset")
    return a


def network(n: object) -> IPNetwork:
    if not isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise ValueError(f"refusing to render {n!r}: not an IP network")
    if isinstance(n, ipaddress.IPv6Network) and n.network_address.scope_id is not None:
        raise ValueError(f"refusing to render {n!r}: a scoped IPv6 network (%zone) has no place in a ruleset")
    return n


def port(p: object) -> int:
    if type(p) is not int or not 1 <= p <= 65535:
        raise ValueError(f"refusing to render port {p!r}")
    return p


def proto(p: object) -> str:
    if not isinstance(p, str) or p not in PROTOS:
        raise ValueError(f"refusing to render protocol {p!r}")
    return p


def portspec(s: object) -> PortSpec:
    if not isinstance(s, PortSpec):
        raise ValueError(f"refusing to render port spec {s!r}")
    proto(s.proto)
    if port(s.first) > port(s.last):
        raise ValueError(f"refusing to render reversed port range {s!r}")
    return s


def check_policy(policy: Policy) -> None:
    """Re-check, by type and by shape, every value of `policy` a renderer prints."""
    if not policy.tunnel.interfaces:
        raise ValueError("a policy needs at least one tunnel interface")
    for name in policy.tunnel.interfaces:
        interface(name)
    for ep in policy.tunnel.endpoints:
        if not isinstance(ep, Endpoint):
            raise ValueError(f"refusing to render endpoint {ep!r}")
        address(ep.address)
        port(ep.port)
        proto(ep.proto)
    for cg in policy.tunnel.endpoint_cgroups:
        cgroup(cg, "endpoint cgroup")
    for s in policy.dns.servers:
        address(s)
    if not isinstance(policy.lan.allow, bool):
        raise ValueError(f"refusing to render lan.allow {policy.lan.allow!r}")
    for n in policy.lan.networks:
        network(n)
    if policy.ipv6.mode not in ("tunnel", "block"):
        raise ValueError(f"refusing to render ipv6 mode {policy.ipv6.mode!r}")
    for ex in policy.exemptions:
        if not isinstance(ex, Exemption):
            raise ValueError(f"refusing to render exemption {ex!r}")
        cgroup(ex.cgroup, "exempt cgroup")
        for spec in (*ex.allow, *ex.listen):
            portspec(spec)
        for n in (*ex.to, *ex.from_):
            network(n)


def printable(name: str, text: str) -> str:
    """Only printable ASCII and newlines leave a renderer: no control character, no
    Unicode quote (PowerShell reads U+2018/U+2019 as quotes) can hide in a file."""
    if not all(c == "\n" or " " <= c <= "~" for c in text):
        raise ValueError(f"refusing to emit {name}: a non-printable or non-ASCII character slipped through")
    return text


def subject(value: object, what: str, kind: str, validate: Callable[[str], str]) -> str:
    """A platform subject (macOS user, Windows service or program) through the policy's own
    validator, refused naming the key `what` and the `kind` of value expected."""
    if not isinstance(value, str):
        raise ValueError(f"refusing to render {what} {value!r}: {kind}")
    try:
        return validate(value)
    except ValueError as e:
        raise ValueError(f"refusing to render {what}: {e}") from None
