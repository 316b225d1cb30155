"""The kernel layers agree with verdict() (what `ksctl explain` prints) on generated
policies, not only on the fixed ones of test_nft_oracle and test_bpf: hypothesis draws LAN
networks, DNS servers, endpoints, endpoint cgroups, exemptions and the IPv6 mode; each
policy is applied for real (nftables in a network namespace, BPF on a cgroup this test
made) and outbound datagrams are decided by the kernel."""

from __future__ import annotations

import ipaddress
import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksbpf.linux.nftables import NftLayer
from ksbpf.marks import exempt_mark, exemption_ids
from ksbpf.policy import loads_policy
from ksbpf.verdict import Packet, verdict
from tests.kernel.conftest import NetnsFactory, sh
from tests.kernel.sender import Probe, send_all
from tests.kernel.test_bpf import CASES as BPF_CASES
from tests.kernel.test_bpf import ENDPOINT_MARK, Lab, new_layer, requires_bpf, run_cases
from tests.kernel.test_bpf import lab as lab
from tests.kernel.test_bpf import layers as layers
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
    sent = send_all(u.client, [Probe(d, p, dev=dev, mark=m, sport=sp, payload="oracle") for d, p, dev, m, sp in cases])
    got = [bool(r.sent) if r.sent or r.errors == {"EPERM": 1} else f"errors {r.errors}" for r in sent.results]
    mismatches = []
    for (dst, port, dev, mark, _sport), allowed in zip(cases, got, strict=True):
        assert isinstance(allowed, bool), f"{dst}:{port} via {dev}: unexpected {allowed}"
        packet = Packet("out", "udp", ipaddress.ip_address(dst), sport=40000, dport=port, oif=dev, mark=mark, cgroup=marks[mark])
        v = verdict(policy, packet)
        if v.allow != allowed:
            mismatches.append(f"{dst}:{port} dev={dev} mark={mark:#x}: kernel {'allow' if allowed else 'drop'}, explain {v}")
    assert not mismatches, f"policy:\n{text}\n" + "\n".join(mismatches[:20])


# ------------------------------------------------------------------ the BPF layer



@st.composite
def bpf_policies(draw: Any, lab: Lab) -> str:
    servers = draw(st.lists(st.sampled_from(["10.88.0.2", "10.88.0.3", "fd88::2"]), max_size=2, unique=True))
    lan_nets = draw(st.lists(st.sampled_from(["10.77.0.0/24", "fd77::/64", "10.77.0.3/32"]), max_size=2, unique=True))
    mark = draw(st.sampled_from([f"endpoint_mark = {ENDPOINT_MARK}\n", ""]))
    ex_allow = draw(st.lists(st.sampled_from(["udp/5300-5310", "udp/5301", "udp/5306-5311", "udp/53", "tcp/443"]),
                             min_size=1, max_size=3, unique=True))
    ex_to = draw(st.lists(st.sampled_from(["10.77.0.2/32", "fd77::2/128", "10.77.0.0/24"]), max_size=2, unique=True))
    svc_from = draw(st.lists(st.sampled_from(["10.77.0.2/32", "10.77.0.0/24"]), max_size=1))
    child = draw(st.booleans())  # the child exempted on its own (longest prefix wins)
    text = f"""
[tunnel]
interfaces = ["wg*"]
endpoints = ["10.77.0.2:51820/udp"]
{mark}endpoint_cgroups = ["{lab.rel('w/ep')}"]
[dns]
servers = {json.dumps(servers)}
[lan]
allow = {json.dumps(draw(st.booleans()))}
networks = {json.dumps(lan_nets)}
[ipv6]
mode = "{draw(st.sampled_from(["tunnel", "block"]))}"
[bpf]
cgroup = "{lab.cgroups.rel(lab.root)}"
[[exempt]]
cgroup = "{lab.rel('w/ex')}"
allow = {json.dumps(ex_allow)}
""" + (f"to = {json.dumps(ex_to)}\n" if ex_to else "") + f"""
[[exempt]]
cgroup = "{lab.rel('w/svc')}"
listen = ["udp/5353"]
""" + (f"from = {json.dumps(svc_from)}\n" if svc_from else "")
    if child:
        text += f'[[exempt]]\ncgroup = "{lab.rel("w/ex/child")}"\nallow = ["udp/5305"]\n'
    return text


@requires_bpf
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_generated_policies_bpf_agrees_with_explain(lab: Lab, layers: list[Any], data: Any) -> None:
    """Each generated policy goes into the live maps of one BPF layer (compiled once) and
    every case of test_bpf's table is sent from its cgroup: the kernel's verdict, the
    socket's mark and the drop counters must be what explain says."""
    if not layers:
        new_layer(lab, layers)
    text = data.draw(bpf_policies(lab))
    policy = loads_policy(text)
    layers[0].apply(policy)
    run_cases(lab, layers[0], policy, BPF_CASES)
