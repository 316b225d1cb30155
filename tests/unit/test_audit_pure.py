"""The pure parts of `ksctl audit`: the probe plan the policy judges, the bytes the
probes carry, and the verdict (tests/kernel/test_audit.py runs the whole audit)."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from dataclasses import asdict
from typing import Any

import pytest

from ksbpf.audit.packets import checksum, dns_query, icmp_echo, raw_frame
from ksbpf.audit.plan import DNS_PORT, PROBE_PORT, Interface, Probe, ProbeKind, plan_probes
from ksbpf.audit.report import EXIT_FAIL, EXIT_PASS, EXIT_WARN, judge
from ksbpf.policy import loads_policy

POLICY = """
[tunnel]
interfaces = ["wg0"]
endpoints = ["198.51.100.7:51820/udp"]
endpoint_mark = 0xca6c
[dns]
servers = ["10.64.0.1"]
"""


def probe(kind: ProbeKind, family: int = 4, addr: str = "192.0.2.1", port: int = 9, **kw: Any) -> Probe:
    return Probe(1, kind, "eth0", 2, family, addr, port, "gateway", "no_tunnel", **kw)


def test_every_target_gets_each_kind_and_the_endpoint_its_own_port_too() -> None:
    eth0 = Interface("eth0", 2, True, "02:00:00:00:00:01", {4: ["192.0.2.10"], 6: []})
    eth0.add("192.0.2.1", "gateway")
    eth0.add("198.51.100.7", "endpoint")
    probes, allowed = plan_probes(loads_policy(POLICY), [eth0], "system.slice/ksbpf-audit-x")
    assert allowed == []
    kinds = {(p.addr, p.kind, p.port) for p in probes}
    for addr in ("192.0.2.1", "198.51.100.7"):
        assert {(addr, k, PROBE_PORT) for k in (ProbeKind.TCP, ProbeKind.UDP)} <= kinds
        assert {(addr, ProbeKind.ICMP, 0), (addr, ProbeKind.DNS, DNS_PORT), (addr, ProbeKind.DNS_TCP, DNS_PORT)} <= kinds
    assert ("198.51.100.7", ProbeKind.UDP, 51820) in kinds  # the endpoint's flow, without the endpoint mark
    raw = [p for p in probes if p.kind == ProbeKind.RAW]
    assert [(p.family, p.src, p.src_mac) for p in raw] == [(4, "192.0.2.10", "02:00:00:00:00:01")]
    assert sorted(p.id for p in probes) == list(range(len(probes)))


def test_a_probe_survives_the_json_trip_to_the_worker_and_back() -> None:
    p = probe(ProbeKind.DNS_TCP, 6, "fe80::1", 53)
    back = Probe.from_dict({**json.loads(json.dumps(asdict(p))), "outcome": "stopped"})
    assert back == p and back.kind is ProbeKind.DNS_TCP
    assert p.describe() == "dns/tcp [fe80::1]:53" and probe(ProbeKind.ICMP, port=0).describe() == "icmp 192.0.2.1"
    with pytest.raises(ValueError):
        probe("sctp")  # type: ignore[arg-type]


def test_raw_frames_carry_valid_ipv4_and_ipv6_udp() -> None:
    f4 = raw_frame(probe(ProbeKind.RAW, src="192.0.2.10", src_mac="02:00:00:00:00:01"))
    assert f4[:6] == b"\xff" * 6 and f4[6:12] == bytes.fromhex("020000000001") and f4[12:14] == b"\x08\x00"
    ip = f4[14:34]
    assert checksum(ip) == 0 and ip[9] == 17 and socket.inet_ntoa(ip[16:20]) == "192.0.2.1"
    assert struct.unpack("!HH", f4[34:38]) == (40000, 9) and f4.endswith(b"ksbpf-audit")

    f6 = raw_frame(probe(ProbeKind.RAW, 6, "2001:db8::1", src="2001:db8::10"))
    assert f6[12:14] == b"\x86\xdd"
    src, dst, udp = f6[22:38], f6[38:54], f6[54:]
    assert ipaddress.ip_address(dst) == ipaddress.ip_address("2001:db8::1")
    assert checksum(src + dst + struct.pack("!IxxxB", len(udp), 17) + udp) == 0  # the UDP checksum holds


def test_echo_request_and_dns_query() -> None:
    echo = icmp_echo(4, 0x1234)
    assert echo[0] == 8 and checksum(echo) == 0 and struct.unpack("!H", echo[4:6])[0] == 0x1234
    assert icmp_echo(6, 7)[0] == 128  # the kernel fills in the ICMPv6 checksum
    q = dns_query(0xBEEF)
    assert struct.unpack("!HHH", q[:6]) == (0xBEEF, 0x0100, 1) and b"\x0bksbpf-audit\x07invalid\x00" in q


def result(outcome: str) -> dict[str, Any]:
    return {**asdict(probe(ProbeKind.UDP)), "outcome": outcome, "how": "h"}


@pytest.mark.parametrize("outcomes, tunnel_ok, verdict, code", [
    (["stopped", "stopped", "skipped"], True, "PASS", EXIT_PASS),
    (["stopped", "leaked"], True, "FAIL", EXIT_FAIL),
    (["stopped", "unproven"], True, "FAIL", EXIT_FAIL),
    (["stopped"], False, "WARN", EXIT_WARN),  # nothing left, but the tunnel path does not work
    (["skipped"], True, "WARN", EXIT_WARN),  # nothing could be sent
])
def test_verdict(outcomes: list[str], tunnel_ok: bool, verdict: str, code: int) -> None:
    report = judge({"probes": [result(o) for o in outcomes], "allowed": [],
                    "tunnel": [{"server": "10.64.0.1", "ok": tunnel_ok}]})
    assert (report["verdict"], report["exit"]) == (verdict, code)
    assert report["summary"]["probes"] == len(outcomes)
    assert len(report["leaked"]) == outcomes.count("leaked") and len(report["unproven"]) == outcomes.count("unproven")
