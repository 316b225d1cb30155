"""The macOS and Windows renderings agree with verdict() wherever the platform can express
the policy.

For each policy in adapter_world.cases(), every generated packet (interfaces, families,
protocols, ports, destinations, LAN or not, cgroups, marks, inbound, outbound, forwarded)
is decided three ways: by verdict(), by the PF model (pfparse) reading the rendered anchor
and main ruleset, and by the firewall model (winparse) reading the rendered apply.ps1.

A packet is left out only for a reason written down here:
- it exercises a feature the renderer listed in `unsupported` (the test checks the listing:
  an exclusion without a matching Unsupported entry fails), or
- it meets a platform limit that holds for every policy (forwarding; PF's missing IPv6
  counterpart of check_interface), stated in the renderers' module docs.

test_a_wrong_ruleset_disagrees shows the comparison can fail.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from ksbpf.render.base import Rendered
from ksbpf.render.pf import render_pf
from ksbpf.render.windows import render_windows
from ksbpf.verdict import Packet, Reason, exemption_for, interface_matches, verdict
from tests.unit import pfparse, winparse
from tests.unit.adapter_world import Case, cases, packets, pf_expansion, to_pf, to_win

CASES = {c.name: c for c in cases()}

# Limits of the platform, not of a policy: no Unsupported entry names them.
FORWARD_PF = "limit: PF has no forward hook (a routed packet is filtered in on one interface, out on another)"
FORWARD_WIN = "limit: Windows Defender Firewall does not filter routed traffic"
SPOOF6_PF = "limit: macOS has no IPv6 counterpart of net.inet.ip.check_interface"
STRONG_HOST = (
    "limit: the strong host model (Windows' default; net.inet.ip.check_interface on macOS) also drops a "
    "packet for another interface's address arriving on the tunnel, which verdict() allows (fail closed)"
)


@dataclass
class Outcome:
    compared: int
    excluded: Counter[str]
    mismatches: list[str]


def _unsupported_key(rendered: Rendered, *features: str) -> str | None:
    listed = {u.feature for u in rendered.unsupported}
    for f in features:
        if f in listed:
            return f"unsupported: {f}"
    return None


def _exempt_feature(case: Case, p: Packet, key: str) -> str:
    ex = exemption_for(case.policy, p.cgroup)
    assert ex is not None
    return f"exempt[{case.policy.exemptions.index(ex)}].{key}"


@functools.cache
def _expansion(name: str) -> frozenset[str]:
    return frozenset(pf_expansion(CASES[name].policy))


def pf_exclusion(case: Case, rendered: Rendered, p: Packet, v: Reason) -> str | None:
    if p.direction == "forward":
        return FORWARD_PF
    if p.direction == "in" and not p.local_on_iif and v is Reason.TUNNEL and p.family == 4:
        return STRONG_HOST
    if p.direction == "in" and not p.local_on_iif and p.family == 6 and v is Reason.SPOOFED_LOCAL:
        return SPOOF6_PF
    iface = p.oif if p.direction == "out" else p.iif
    for i, pat in enumerate(case.policy.tunnel.interfaces):
        if pat.endswith("*") and interface_matches(iface, (pat,)) and iface not in _expansion(case.name):
            return _unsupported_key(rendered, f"tunnel.interfaces[{i}]") or "UNLISTED glob"
    if v is Reason.EXEMPT:
        ex = exemption_for(case.policy, p.cgroup)
        if ex is not None and ex.macos_user is None:
            return _unsupported_key(rendered, _exempt_feature(case, p, "macos.user")) or "UNLISTED exemption"
    if v is Reason.ENDPOINT_UNAUTHORIZED and not case.policy.tunnel.macos_endpoint_user:
        return _unsupported_key(rendered, "tunnel.macos.endpoint_user") or "UNLISTED endpoint"
    return None


def win_exclusion(case: Case, rendered: Rendered, p: Packet, v: Reason) -> str | None:
    if p.direction == "forward":
        return FORWARD_WIN
    if p.direction == "in" and not p.local_on_iif and v is Reason.TUNNEL:
        return STRONG_HOST
    if v is Reason.EXEMPT:
        ex = exemption_for(case.policy, p.cgroup)
        assert ex is not None
        if ex.windows_service is None and ex.windows_program is None:
            return _unsupported_key(rendered, _exempt_feature(case, p, "windows")) or "UNLISTED exemption"
    if v is Reason.ENDPOINT_UNAUTHORIZED:
        t = case.policy.tunnel
        if not (t.windows_endpoint_service or t.windows_endpoint_program):
            return _unsupported_key(rendered, "tunnel.windows") or "UNLISTED endpoint"
        for i, ep in enumerate(case.policy.tunnel.endpoints):
            if (ep.address, ep.proto, ep.port) == (p.dst, p.proto, p.dport):
                key = _unsupported_key(rendered, f"tunnel.endpoints[{i}]")
                if key:
                    return key
    if v is Reason.LAN and p.direction == "out" and p.proto not in ("tcp", "udp", "icmp", "icmpv6"):
        return _unsupported_key(rendered, "lan.networks") or "UNLISTED lan"
    return None


def pf_host(rendered: Rendered) -> Callable[[Case, Packet], bool]:
    pf = pfparse.Pf(pfparse.parse(rendered.files["pf.conf"]), {"ksbpf": pfparse.parse(rendered.files["ksbpf.anchor"])})
    check_interface = "sysctl -w net.inet.ip.check_interface=1" in rendered.files["load.sh"]

    def decide(case: Case, p: Packet) -> bool:
        # xnu's check_interface (IPv4, not on loopback) drops after PF has passed a packet.
        if check_interface and p.direction == "in" and p.family == 4 and not p.local_on_iif and p.iif != "lo":
            return False
        return pf.passes(to_pf(case, p))

    decide.explain = lambda case, p: pf.deciding_rule(to_pf(case, p))  # type: ignore[attr-defined]
    return decide


def win_host(rendered: Rendered) -> Callable[[Case, Packet], bool]:
    fw = winparse.parse(rendered.files["apply.ps1"])

    def decide(case: Case, p: Packet) -> bool:
        return fw.allows(to_win(case, p))

    decide.explain = lambda case, p: fw.explain(to_win(case, p))  # type: ignore[attr-defined]
    return decide


def compare(case: Case, platform: str, rendered: Rendered, first_only: bool = False) -> Outcome:
    host = pf_host(rendered) if platform == "macos" else win_host(rendered)
    exclude = pf_exclusion if platform == "macos" else win_exclusion
    out = Outcome(0, Counter(), [])
    for p in packets(case.policy):
        v = verdict(case.policy, p)
        why = exclude(case, rendered, p, v.reason)
        if why is not None:
            out.excluded[why] += 1
            continue
        out.compared += 1
        got = host(case, p)
        if got != v.allow and first_only:
            out.mismatches.append(f"{p}: verdict {v}")
            break
        if got != v.allow and len(out.mismatches) < 20:
            out.mismatches.append(f"{p}\n    verdict: {v}; {platform}: {'allow' if got else 'drop'} by {host.explain(case, p)}")  # type: ignore[attr-defined]
        elif got != v.allow:
            out.mismatches.append("...")
    return out


def render(case: Case, platform: str) -> Rendered:
    return render_pf(case.policy) if platform == "macos" else render_windows(case.policy)


@functools.cache
def outcome(name: str, platform: str) -> Outcome:
    case = CASES[name]
    return compare(case, platform, render(case, platform))


@pytest.mark.parametrize("platform", ["macos", "windows"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_rules_agree_with_verdict(name: str, platform: str) -> None:
    out = outcome(name, platform)
    assert not [k for k in out.excluded if k.startswith("UNLISTED")], f"excluded without an Unsupported entry: {out.excluded}"
    assert not out.mismatches, f"{len(out.mismatches)} disagreements, first ones:\n" + "\n".join(out.mismatches[:20])
    total = out.compared + sum(out.excluded.values())
    assert out.compared > 0.6 * total, f"too much left out: {out.excluded}"


def test_mapped_identities_shrink_what_is_left_out() -> None:
    """With the tunnel client's user/program and the exemptions mapped, only limits remain."""
    for platform in ("macos", "windows"):
        out = outcome("full-mapped", platform)
        left = {k for k in out.excluded if not k.startswith("limit:")}
        assert left <= {"unsupported: lan.networks"}, (platform, out.excluded)


# ------------------------------------------------------------------ the test can fail


def _mutate(rendered: Rendered, name: str, fn: Callable[[str], str]) -> Rendered:
    files = dict(rendered.files)
    files[name] = fn(files[name])
    assert files[name] != rendered.files[name], "the mutation changed nothing"
    return Rendered(rendered.platform, files, rendered.unsupported)


def _swap_lines(text: str, a: str, b: str) -> str:
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(a))
    j = next(i for i, ln in enumerate(lines) if ln.startswith(b))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines) + "\n"


WRONG_PF = {
    # Without quick, PF's last match wins: the closing block swallows everything.
    "no quick": lambda t: t.replace(" quick", ""),
    # The tunnel's pass-all before its DNS block: DNS to any resolver through the tunnel.
    "tunnel pass before DNS block": lambda t: _swap_lines(t, "block drop out quick on $ksbpf_tunnel proto", "pass out quick on $ksbpf_tunnel all"),
    # LAN before the DNS block: a LAN resolver is a leak.
    "LAN before DNS": lambda t: _swap_lines(t, "block drop out quick proto { tcp udp }", "pass out quick to "),
}

WRONG_WIN = {
    # The reference article's recipe: a Block-all rule plus an allow for the VPN. Block beats
    # allow, so it blocks the tunnel too (and the default outbound stays Allow).
    "block-all rule": lambda t: t.replace("-DefaultOutboundAction Block", "-DefaultOutboundAction Allow").replace(
        "$Rules = @(\n", "$Rules = @(\n    @{ Name = 'x'; DisplayName = 'x'; Direction = 'Outbound'; Action = 'Block' }\n"),
    # Without the tunnel's DNS blocks, DNS goes to any resolver through the tunnel.
    "no tunnel DNS block": lambda t: "\n".join(ln for ln in t.splitlines() if "ksbpf-out-tunnel-dns" not in ln) + "\n",
    # LAN allowed for every port: DNS to a LAN resolver leaks.
    "LAN with DNS": lambda t: re.sub(r"RemotePort = @\('0-52', '54-852', '854-65535'\); ", "", t),
}


@pytest.mark.parametrize(("platform", "label"), [("macos", k) for k in WRONG_PF] + [("windows", k) for k in WRONG_WIN])
def test_a_wrong_ruleset_disagrees(platform: str, label: str) -> None:
    case = CASES["full-mapped"]
    rendered = render(case, platform)
    if platform == "macos":
        wrong = _mutate(rendered, "ksbpf.anchor", WRONG_PF[label])
    else:
        wrong = _mutate(rendered, "apply.ps1", WRONG_WIN[label])
    assert compare(case, platform, wrong, first_only=True).mismatches, f"{label}: the comparison did not notice"
