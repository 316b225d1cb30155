"""The nftables layer agrees with verdict() (what `ksctl explain` prints) on generated
policies, not only on the fixed one of test_nft_oracle: hypothesis draws LAN networks, DNS
servers, endpoints, exemptions and the IPv6 mode; each policy is applied for real in a
network namespace this test made, and outbound datagrams are decided by the kernel."""

from __future__ import annotations

import ipaddress
import itertools
import json
import sys
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksbpf.linux.nftables import NftLayer
from ksbpf.marks import exempt_mark, exemption_ids
from ksbpf.policy import loads_policy
from ksbpf.verdict import Packet, verdict
from tests.kernel.conftest import NetnsFactory, sh
from tests.kernel.test_nft_oracle import SENDER
from tests.kernel.uplink import build_uplink

# Remote addresses only: 10.64.0.2 is the client's own (local delivery goes through lo).
LAN = ["192.168.7.0/24", "fd07::/64", "10.9.0.0/16"]
NETS = ["198.51.100.0/24", "203.0.113.0/24", "2001:db8:5::/48"]
DSTS = ["10.64.0.1", "10.64.0.3", "203.0.113.9", "192.0.2.1", "198.51.100.5", "192.168.7.9", "10.9.1.1",
        "fd00:64::1", "2001:db8:1::1", "fd07::9", "2001:db8:5::9"]
PORTS = [53, 123, 443, 853, 51820]
CGROUPS = ["ntp.service", "backup.service", "sync.service"]


@st.composite
def extras(draw: Any) -> tuple[str, list[str], list[str]]:
    """Policy text beyond the uplink's tunnel, the exempt cgroups, and extra endpoints."""
    out = []
    endpoints = draw(st.lists(st.sampled_from(["198.51.100.5:443/udp", "[2001:db8:1::1]:51820/udp"]), unique=True))
    servers = draw(st.lists(st.sampled_from(["10.64.0.1", "10.64.0.3", "fd00:64::1"]), min_size=0, max_size=2, unique=True))
    out.append(f"[dns]\nservers = {json.dumps(servers)}\n")
    if draw(st.booleans()):
        nets = draw(st.lists(st.sampled_from(LAN), max_size=2, unique=True))
        out.append(f"[lan]\nallow = {json.dumps(draw(st.booleans()))}\nnetworks = {json.dumps(nets)}\n")
    out.append(f'[ipv6]\nmode = "{draw(st.sampled_from(["tunnel", "block"]))}"\n')
    cgroups = draw(st.lists(st.sampled_from(CGROUPS), max_size=2, unique=True))
    for cg in cgroups:
        port = draw(st.sampled_from(PORTS))
        allow = f"udp/{port}" if draw(st.booleans()) else f"udp/{port}-{port + 400}"
        out.append(f'[[exempt]]\ncgroup = "{cg}"\nallow = ["{allow}"]\n')
        to = draw(st.lists(st.sampled_from(NETS), max_size=2, unique=True))
        if to:
            out.append(f"to = {json.dumps(to)}\n")
    return "".join(out), cgroups, endpoints


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=extras())
def test_generated_policies_nftables_agrees_with_explain(make_netns: NetnsFactory, drawn: Any) -> None:
    extra, cgroups, endpoints = drawn
    if not hasattr(make_netns, "_uplink"):  # one uplink for every example: only the ruleset changes
        u = build_uplink(make_netns)
        sh("ip", "-6", "route", "add", "default", "dev", u.tun_if, "metric", "4000", netns=u.client)
        make_netns._uplink = u  # type: ignore[attr-defined]
    u = make_netns._uplink  # type: ignore[attr-defined]
    text = u.policy().replace('[dns]\nservers = ["10.64.0.1"]\n', "") + extra
    if endpoints:
        text = text.replace('["192.0.2.1:51820/udp"]', json.dumps(["192.0.2.1:51820/udp", *endpoints]))
    policy = loads_policy(text)
    NftLayer(u.client).apply(policy)
    ids = exemption_ids(cgroups)
    marks: dict[int, str | None] = {0: None, 0xCA6C: None, **{exempt_mark(ids[cg]): cg for cg in cgroups}}
    cases = [(d, p, dev, m, 0) for d, p, dev, m in itertools.product(DSTS, PORTS, [u.tun_if, u.up_if], marks)]
    got = json.loads(sh(sys.executable, "-c", SENDER, netns=u.client, input=json.dumps(cases)).stdout)
    mismatches = []
    for (dst, port, dev, mark, _sport), allowed in zip(cases, got, strict=True):
        assert isinstance(allowed, bool), f"{dst}:{port} via {dev}: unexpected {allowed}"
        packet = Packet("out", "udp", ipaddress.ip_address(dst), sport=40000, dport=port, oif=dev, mark=mark, cgroup=marks[mark])
        v = verdict(policy, packet)
        if v.allow != allowed:
            mismatches.append(f"{dst}:{port} dev={dev} mark={mark:#x}: kernel {'allow' if allowed else 'drop'}, explain {v}")
    assert not mismatches, f"policy:\n{text}\n" + "\n".join(mismatches[:20])
