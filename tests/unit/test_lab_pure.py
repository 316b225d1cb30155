"""The lab's pure parts: the DNS codec its resolvers and probes share, the policy it
writes, and how it reads the far-side counter. No root, no kernel."""

from __future__ import annotations

import struct
import tomllib
from typing import Any

import pytest

from ksbpf.lab import agent as lab_agent
from ksbpf.lab.addresses import COUNTER_TABLE, ENDPOINT_PORT, SERVER_V4
from ksbpf.lab.rulesets import counter_ruleset, merge_policy, parse_counters, render_toml


@pytest.mark.parametrize(("qtype", "a", "aaaa", "want"), [
    ("A", "198.51.100.10", "2001:db8:2::10", ["198.51.100.10"]),
    ("AAAA", "198.51.100.10", "2001:db8:2::10", ["2001:db8:2::10"]),
    ("TXT", "198.51.100.10", "2001:db8:2::10", []),
    ("AAAA", "198.51.100.10", None, []),
])
def test_dns_round_trip(qtype: str, a: str, aaaa: str | None, want: list[str]) -> None:
    query = lab_agent.dns_query_packet("www.lab.example", lab_agent.QTYPES[qtype], qid=0x1234)
    qid, name, parsed_type, end = lab_agent.dns_parse_query(query)
    assert (qid, name, parsed_type, end) == (0x1234, "www.lab.example", lab_agent.QTYPES[qtype], len(query))
    rcode, addrs = lab_agent.dns_parse_answer(lab_agent.dns_answer_packet(query, a, aaaa), 0x1234)
    assert rcode == 0 and addrs == want


def test_dns_rejects_mismatched_and_malformed_messages() -> None:
    query = lab_agent.dns_query_packet("lab.example", 1, qid=7)
    answer = lab_agent.dns_answer_packet(query, "192.0.2.66", None)
    with pytest.raises(ValueError, match="does not match"):
        lab_agent.dns_parse_answer(answer, 8)
    with pytest.raises(ValueError):
        lab_agent.dns_parse_query(query[:14])
    with pytest.raises(ValueError, match="not a single-question query"):
        lab_agent.dns_parse_query(answer)
    loop = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c"
    with pytest.raises(ValueError):
        lab_agent.dns_parse_query(loop)


def test_icmp_checksum_of_a_known_echo_request() -> None:
    header = struct.pack("!BBHHH", 8, 0, 0, 1, 1)
    packet = struct.pack("!BBHHH", 8, 0, lab_agent._icmp_checksum(header), 1, 1)
    assert lab_agent._icmp_checksum(packet) == 0


def test_policy_render_and_merge() -> None:
    base: dict[str, Any] = {
        "tunnel": {"interfaces": ["wgc123456"], "endpoints": [f"{SERVER_V4}:{ENDPOINT_PORT}/udp"], "endpoint_mark": 0xCA6C},
        "dns": {"servers": ["10.64.0.1"]},
        "lan": {"allow": False},
    }
    merged = merge_policy(base, {
        "dns": {"servers": ["10.64.0.1", "fd00:64::1"]},
        "lan": None,
        "exempt": [{"cgroup": "a/b.service", "allow": ["udp/123"], "to": ["192.0.2.0/24"]}],
        "tunnel": {"endpoint_cgroups": ["ksbpf-lab-x/wireguard"]},
    })
    text = render_toml(merged)
    assert "endpoint_mark = 0xca6c" in text
    data = tomllib.loads(text)
    assert data == {
        "tunnel": {**base["tunnel"], "endpoint_cgroups": ["ksbpf-lab-x/wireguard"]},
        "dns": {"servers": ["10.64.0.1", "fd00:64::1"]},
        "exempt": [{"cgroup": "a/b.service", "allow": ["udp/123"], "to": ["192.0.2.0/24"]}],
    }
    assert base["dns"] == {"servers": ["10.64.0.1"]}, "the base is not modified"


def test_counter_ruleset_replaces_itself_atomically() -> None:
    text = counter_ruleset("uplink", client_port=51821)
    # Create-then-delete-then-create in one file: one transaction, whether or not it existed.
    assert text.index(f"table netdev {COUNTER_TABLE} {{}}") < text.index(f"delete table netdev {COUNTER_TABLE}")
    assert 'device "uplink"' in text
    assert f"udp sport 51821 udp dport {ENDPOINT_PORT}" in text


def test_parse_counters() -> None:
    doc = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "netdev", "name": "tunnel", "table": COUNTER_TABLE, "packets": 40, "bytes": 1}},
        {"counter": {"family": "netdev", "name": "leaks", "table": COUNTER_TABLE, "packets": 5, "bytes": 1}},
        {"counter": {"family": "netdev", "name": "link", "table": COUNTER_TABLE, "packets": 2, "bytes": 1}},
        {"set": {"name": "leak4", "elem": [
            {"elem": {"val": {"concat": ["192.0.2.2", "198.51.100.10", "udp", 7]}, "counter": {"packets": 3, "bytes": 9}}},
        ]}},
        {"set": {"name": "leak6", "elem": [
            {"elem": {"val": {"concat": ["2001:db8:1::2", "2001:db8:2::10", "tcp", 7]}, "counter": {"packets": 1, "bytes": 9}}},
        ]}},
        {"set": {"name": "leak4i", "elem": [
            {"elem": {"val": {"concat": ["192.0.2.2", "192.0.2.1", "destination-unreachable", "port-unreachable"]},
                      "counter": {"packets": 1, "bytes": 9}}},
        ]}},
        {"set": {"name": "leak6o"}},
    ]}
    c = parse_counters(doc)
    assert (c.tunnel, c.leaks, c.link) == (40, 5, 2)
    assert c.details == (
        "udp 192.0.2.2 → 198.51.100.10:7 ×3",
        "icmp 192.0.2.2 → 192.0.2.1 destination-unreachable/port-unreachable ×1",
        "tcp 2001:db8:1::2 → [2001:db8:2::10]:7 ×1",
    )
