"""Interface names in a policy are exactly those libnftables takes as names: the parser
refuses a name if and only if libnftables would refuse the ruleset built from it. Every
/etc/protocols name and alias is tried, plus nft's own keywords, on the real libnftables
in a network namespace this test makes."""

from __future__ import annotations

import re
from pathlib import Path

from ksbpf.errors import BackendError, PolicyError
from ksbpf.linux.nftables import NftLayer
from ksbpf.policy import NFT_JSON_PROTOCOL_WORDS, loads_policy
from tests.kernel.conftest import NetnsFactory

NFT_WORDS = ["ip", "ip6", "inet", "arp", "bridge", "netdev", "vlan", "ether", "th", "meta", "ct", "mh", "rt",
             "hbh", "frag", "dst", "accept", "drop", "reject", "counter", "any", "all", "ipv6-icmp", "gre"]


def candidate_names() -> list[str]:
    words = set(NFT_WORDS) | NFT_JSON_PROTOCOL_WORDS | {"@set", "@ksbpf_tunnel_ifs", "wg0", "tun*"}
    protocols = Path("/etc/protocols")
    if protocols.exists():
        for line in protocols.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if fields:
                words.add(fields[0])
                words.update(fields[2:])
    return sorted(w for w in words if re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}\*?", w) and w != "lo")


def test_the_parser_refuses_exactly_the_names_libnftables_cannot_take(make_netns: NetnsFactory) -> None:
    ns = make_netns("ksnm")
    layer = NftLayer(ns)
    disagree = []
    for name in candidate_names():
        text = f'[tunnel]\ninterfaces = ["{name}"]\n'
        try:
            policy = loads_policy(text)
            parsed = True
        except PolicyError:
            parsed = False
            # Still ask libnftables, with the name smuggled past the parser.
            from dataclasses import replace

            base = loads_policy('[tunnel]\ninterfaces = ["wg0"]\n')
            policy = replace(base, tunnel=replace(base.tunnel, interfaces=(name,)))
        try:
            layer.apply(policy)
            applied = True
        except BackendError:
            applied = False
        if parsed != applied:
            disagree.append((name, "parser " + ("accepts" if parsed else "refuses"),
                             "libnftables " + ("applies" if applied else "refuses")))
    assert not disagree, disagree
    assert len(candidate_names()) > 30  # the comparison covered something
