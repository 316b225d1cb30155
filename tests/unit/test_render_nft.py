from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ksbpf.policy import Exemption, PortSpec, load_policy, loads_policy
from ksbpf.render.nft import counter_names, render_nft, render_nft_reset
from ksbpf.render.routing import render_routing
from ksbpf.verdict import DROP_REASONS
from tests.unit.adapter_world import cases, check_golden, tunnel_names

P = load_policy(Path(__file__).parent / "policies" / "full.toml")
CASES = {c.name: c for c in cases()}


def _one_command_per_line(batch: dict[str, list[dict[str, Any]]]) -> str:
    """The batch as JSON that nft -j -f reads, one command a line: a changed rule is a
    changed line in the diff of a golden file."""
    cmds = ",\n".join(json.dumps(c) for c in batch["nftables"])
    return '{"nftables": [\n' + cmds + "\n]}\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    """The example policies of the PF and Windows golden files, rendered for Linux: the
    nftables batch with two uplinks (their egress chains) and the routing plan with a tunnel
    up. KSBPF_UPDATE_GOLDEN=1 rewrites tests/unit/golden/linux/ (review the diff)."""
    policy = CASES[name].policy
    ruleset = render_nft(policy, uplinks={2: "eth0", 3: "wlan0"})
    assert json.loads(_one_command_per_line(ruleset)) == ruleset
    routing = render_routing(policy, tunnel_links={7: tunnel_names(policy)[0]})
    files = {"ruleset.json": _one_command_per_line(ruleset), "routing.txt": "".join(f"{ln}\n" for ln in routing.describe())}
    check_golden("linux", name, files, None)


def _adds(batch: dict, kind: str, family: str = "inet") -> list[dict]:
    return [c["add"][kind] for c in batch["nftables"] if kind in c.get("add", {}) and c["add"][kind]["family"] == family]


def test_batch_replaces_both_tables_atomically() -> None:
    cmds = render_nft(P)["nftables"]
    assert cmds[0] == {"metainfo": {"json_schema_version": 1}}
    heads = [next(iter(c)) + ":" + c[next(iter(c))].get("table", {}).get("family", "") for c in cmds[1:7]]
    assert heads == ["add:inet", "delete:inet", "add:inet", "add:netdev", "delete:netdev", "add:netdev"]
    json.dumps(render_nft(P))  # serialisable as is


def test_base_chains_drop_by_default_and_tunnel_accept_comes_first() -> None:
    b = render_nft(P)
    chains = {c["name"]: c for c in _adds(b, "chain")}
    for name in ("output", "input", "forward"):
        assert chains[name]["policy"] == "drop" and chains[name]["hook"] == name
    first = next(r for r in _adds(b, "rule") if r["chain"] == "output")
    assert first["expr"][0]["match"]["left"] == {"meta": {"key": "oifname"}}
    assert first["expr"][0]["match"]["right"] == "wg0"
    assert first["expr"][-1] == {"accept": None}


def test_a_named_counter_per_drop_reason_and_family() -> None:
    names = {c["name"] for c in _adds(render_nft(P), "counter")} | {c["name"] for c in _adds(render_nft(P), "counter", "netdev")}
    assert names == {n for n, _, _ in counter_names()}
    assert len(names) == 2 * len(DROP_REASONS)


def test_counter_seeds_carry_values_over_a_reapply() -> None:
    b = render_nft(P, counter_seeds={"drop_dns_ip4": (7, 700)})
    c = next(c for c in _adds(b, "counter") if c["name"] == "drop_dns_ip4")
    assert (c["packets"], c["bytes"]) == (7, 700)


def test_rule_count_does_not_grow_with_exemptions_or_endpoints() -> None:
    base = loads_policy('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["192.0.2.1:51820/udp"]\nendpoint_mark = 1\n')
    many = base.with_exemptions(tuple(Exemption(f"s.slice/u{i}.service", allow=(PortSpec("tcp", 443, 443),)) for i in range(10_000)))
    small, big = render_nft(base), render_nft(many)
    assert len(_adds(small, "rule")) == len(_adds(big, "rule"))
    allow4 = next(s for s in _adds(big, "set") if s["name"] == "exempt_allow4")
    assert len(allow4["elem"]) == 10_000


def test_netdev_egress_chain_per_uplink() -> None:
    b = render_nft(P, uplinks={2: "eth0", 3: "wlan0"})
    egress = [c for c in _adds(b, "chain", "netdev") if c.get("hook") == "egress"]
    assert sorted((c["name"], c["dev"]) for c in egress) == [("egress_if2", "eth0"), ("egress_if3", "wlan0")]


def test_overlapping_grants_are_merged_for_interval_sets() -> None:
    p = loads_policy('[tunnel]\ninterfaces = ["wg0"]\n[[exempt]]\ncgroup = "a"\nallow = ["tcp/10-20", "tcp/15-30", "tcp/31"]\nto = ["10.0.0.0/8", "10.1.0.0/16"]\n')
    s = next(s for s in _adds(render_nft(p), "set") if s["name"] == "exempt_allow4")
    assert len(s["elem"]) == 1
    _mark, net, proto, ports = s["elem"][0]["concat"]
    assert net == {"prefix": {"addr": "10.0.0.0", "len": 8}} and proto == "tcp" and ports == {"range": [10, 31]}


def test_reset_deletes_both_tables() -> None:
    cmds = render_nft_reset()["nftables"]
    assert [next(iter(c)) for c in cmds[1:]] == ["add", "delete", "add", "delete"]


def test_reverse_path_marks_and_minisocks_are_handled_before_the_inbound_drop() -> None:
    """rp_filter would drop replies to exempt sockets while the tunnel is down (see
    _prerouting); TCP request and TIME_WAIT socks have no readable mark (see
    _tcp_minisock_chain). The kernel tests in test_exemptions.py show both matter."""
    b = render_nft(P)
    chains = {c["name"]: c for c in _adds(b, "chain")}
    assert chains["prerouting"]["hook"] == "prerouting" and chains["prerouting"]["policy"] == "accept"
    rules = _adds(b, "rule")
    pre = [r["expr"] for r in rules if r["chain"] == "prerouting"]
    assert pre[0][0]["match"]["left"] == {"meta": {"key": "iifname"}}, "tunnel traffic skips the socket lookups"
    marks = [e["mangle"]["value"] for r in pre for e in r if "mangle" in e]
    assert marks == [0x4B000000, P.endpoint_mark, P.endpoint_mark]
    inbound = [r["expr"] for r in rules if r["chain"] == "input"]
    jumps = [e["jump"]["target"] for r in inbound for e in r if "jump" in e]
    assert jumps == ["exempt_in", "input_minisock"]
    assert any("drop" in e for e in inbound[-1]), "the final inbound drop comes after them"
    for name, action in (("input_minisock", {"accept": None}), ("prerouting_minisock", {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x4B000000}})):
        first, second = (r["expr"] for r in rules if r["chain"] == name)
        assert first == [{"match": {"op": ">=", "left": {"socket": {"key": "mark"}}, "right": 0}}, {"return": None}]
        assert second == [action]


def _elements(batch: dict, verb: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in batch["nftables"]:
        if verb in c:
            e = c[verb]["element"]
            out.setdefault(f"{e['family']} {e['name']}", []).extend(e["elem"])
    return out


def test_exemption_change_carries_only_the_changed_exemptions() -> None:
    from ksbpf.marks import exempt_mark, exemption_ids
    from ksbpf.render.nft import render_exemption_change

    base = loads_policy('[tunnel]\ninterfaces = ["wg0"]\n')
    many = tuple(Exemption(f"s.slice/u{i}.service", allow=(PortSpec("tcp", 443, 443),)) for i in range(1000))
    before = base.with_exemptions(many)
    new = Exemption("s.slice/new.service", listen=(PortSpec("tcp", 22, 22),))
    after = base.with_exemptions((*many[1:], new))  # u0 goes, new comes, 999 stay
    batch = render_exemption_change(before, after)
    assert batch is not None
    ids = exemption_ids([e.cgroup for e in after.exemptions])
    gone, came = _elements(batch, "delete"), _elements(batch, "add")
    assert set(gone) == {"inet exempt_allow4", "netdev exempt_allow4", "inet exempt_allow6", "netdev exempt_allow6"}
    old_mark = exempt_mark(exemption_ids([e.cgroup for e in before.exemptions])["s.slice/u0.service"])
    assert all(el["concat"][0] == old_mark for els in gone.values() for el in els)
    assert set(came) == {"inet exempt_listen4", "netdev exempt_listen4", "inet exempt_listen6", "netdev exempt_listen6"}
    assert all(el["concat"][0] == exempt_mark(ids["s.slice/new.service"]) for els in came.values() for el in els)
    deletes_first = [next(iter(c)) for c in batch["nftables"][1:]]
    assert deletes_first == sorted(deletes_first, key=lambda v: v != "delete")
    nothing = render_exemption_change(after, after)
    assert nothing is not None and nothing["nftables"][1:] == []


def test_exemption_change_refuses_when_ids_would_move() -> None:
    """Ids probe upward in sorted order on a crc collision: a new cgroup that collides with
    one in force and sorts before it would move that one's id (its sockets' marks)."""
    import zlib

    from ksbpf.marks import EXEMPT_ID_MASK
    from ksbpf.render.nft import render_exemption_change

    seen: dict[int, str] = {}
    i = 0
    while True:
        name = f"s.slice/c{i}.service"
        h = zlib.crc32(name.encode()) & EXEMPT_ID_MASK
        if h in seen:
            break
        seen[h] = name
        i += 1
    first, second = sorted([seen[h], name])
    base = loads_policy('[tunnel]\ninterfaces = ["wg0"]\n')
    tcp = (PortSpec("tcp", 443, 443),)
    before = base.with_exemptions((Exemption(second, allow=tcp),))
    after = base.with_exemptions((Exemption(first, allow=tcp), Exemption(second, allow=tcp)))
    assert render_exemption_change(before, after) is None
    assert render_exemption_change(after, base.with_exemptions((Exemption(first, allow=tcp), Exemption(second, listen=tcp)))) is not None


def test_set_changes_carry_only_what_differs_and_share_the_skeleton() -> None:
    """Two policies that differ in endpoints, exemptions or LAN networks render the same
    skeleton (no set elements), and render_set_changes carries just the difference."""
    from ksbpf.render.nft import render_set_changes

    def pol(endpoints: list[str], lan: str) -> str:
        return (f'[tunnel]\ninterfaces = ["wg0"]\nendpoints = {json.dumps(endpoints)}\nendpoint_mark = 0xca6c\n'
                f'[lan]\nallow = true\nnetworks = ["{lan}"]\n')

    eps = [f"198.18.0.{i}:51820/udp" for i in range(1, 200)]
    before = loads_policy(pol(eps, "192.168.1.0/24"))
    after = loads_policy(pol([*eps[1:], "[2001:db8::1]:51820/udp"], "192.168.1.0/24"))
    assert render_nft(before, {2: "eth0"}, elements=False) == render_nft(after, {2: "eth0"}, elements=False)
    assert render_nft(before, {2: "eth0"}) != render_nft(after, {2: "eth0"})
    batch = render_set_changes(before, after)
    assert batch is not None
    gone, came = _elements(batch, "delete"), _elements(batch, "add")
    assert gone == {f"{t} endpoints4": [{"concat": ["198.18.0.1", "udp", 51820]}] for t in ("inet", "netdev")}
    assert came == {f"{t} endpoints6": [{"concat": ["2001:db8::1", "udp", 51820]}] for t in ("inet", "netdev")}
    assert not any("flush" in c for c in batch["nftables"])

    lan_moved = loads_policy(pol(eps, "192.168.2.0/24"))
    batch = render_set_changes(before, lan_moved)
    assert batch is not None
    flushed = [c["flush"]["set"] for c in batch["nftables"] if "flush" in c]
    assert {(s["family"], s["name"]) for s in flushed} == {("inet", "lan4"), ("netdev", "lan4")}  # lan6 is unchanged
    assert _elements(batch, "add") == {f"{t} lan4": [{"prefix": {"addr": "192.168.2.0", "len": 24}}] for t in ("inet", "netdev")}
    same = render_set_changes(before, loads_policy(pol(eps, "192.168.1.0/24")))
    assert same is not None and same["nftables"][1:] == []
