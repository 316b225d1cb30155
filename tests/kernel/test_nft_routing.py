"""nftables and routing layers on the kernel, with a veth playing the tunnel (the
WireGuard lab tests are in test_killswitch.py). Leaks are counted on the far side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kernel.conftest import NetnsFactory, sh
from tests.kernel.sender import send_frames, send_udp, start_flood
from tests.kernel.uplink import Uplink, build_uplink, ksctl, veth


@pytest.fixture
def uplink(make_netns: NetnsFactory) -> Uplink:
    return build_uplink(make_netns)


def _up(u: Uplink, tmp_path: Path, text: str, *extra: str) -> None:
    cfg = tmp_path / "policy.toml"
    cfg.write_text(text)
    r = ksctl("up", "--config", str(cfg), "--no-bpf", *extra, netns=u.client, state_dir=str(tmp_path / "state"))
    assert r.returncode == 3, r.stdout + r.stderr  # 3: nft + routing engaged, bpf disabled
    assert "nftables  engaged" in r.stdout and "routing   engaged" in r.stdout


def _nft_counter(netns: str, name: str, family: str = "inet", table: str = "ksbpf") -> int:
    out = sh("nft", "-j", "list", "counter", family, table, name, netns=netns).stdout
    return int(next(o for o in json.loads(out)["nftables"] if "counter" in o)["counter"]["packets"])


def test_uplink_counts_leaks_without_the_kill_switch(uplink: Uplink) -> None:
    """The far-side counter can fail: with no kill switch, direct traffic arrives."""
    before = uplink.far_count()
    assert send_udp(uplink.client, "192.0.2.1", 9, 20) == 20
    assert uplink.far_count() - before >= 20


def test_af_packet_frames_to_the_uplink_are_stopped(uplink: Uplink, tmp_path: Path) -> None:
    raw = lambda n: send_frames(uplink.client, uplink.up_if, n)  # noqa: E731
    before = uplink.far_count()
    assert raw(10) == 10
    assert uplink.far_count() - before == 10, "raw frames must reach the far side without ksbpf"
    _up(uplink, tmp_path, uplink.policy())
    before = uplink.far_count()
    assert raw(25) == 25
    assert uplink.far_count() == before  # the netdev egress chain drops them
    assert _nft_counter(uplink.client, "drop_raw_egress_ip4", "netdev") == 25


def test_tunnel_traffic_passes_and_everything_else_is_counted_per_reason(uplink: Uplink, tmp_path: Path) -> None:
    _up(uplink, tmp_path, uplink.policy())
    t0, f0 = uplink.tunnel_count(), uplink.far_count()
    assert send_udp(uplink.client, "203.0.113.9", 9, 30) == 30  # routed into the tunnel
    assert send_udp(uplink.client, "10.64.0.1", 53, 5) == 5  # the tunnel's resolver
    assert send_udp(uplink.client, "203.0.113.9", 53, 7) == 0  # another resolver via the tunnel
    assert uplink.tunnel_count() - t0 >= 35
    assert _nft_counter(uplink.client, "drop_dns_ip4") == 7
    # plaintext to the endpoint port without the mark, and another port on the server:
    # routing sends them into the tunnel, never out of the uplink
    assert send_udp(uplink.client, "192.0.2.1", 51820, 4) == 4
    assert send_udp(uplink.client, "192.0.2.1", 22, 4) == 4
    assert uplink.far_count() == f0


# The kernel sends MLD reports on its own for a while after an interface comes up; ksbpf
# drops them (only neighbour discovery passes) and counts them as no_tunnel_ip6. This table,
# ahead of ksbpf's output chain, counts them, so a test can tell them from its own packets.
MLD_COUNT = """
table inet mldcount {
  counter mld { }
  chain output {
    type filter hook output priority -300; policy accept;
    icmpv6 type { mld-listener-report, mld-listener-done, mld2-listener-report } counter name "mld"
  }
}
"""


def test_nftables_alone_holds_when_routing_is_removed(uplink: Uplink, tmp_path: Path) -> None:
    sh("nft", "-f", "-", netns=uplink.client, input=MLD_COUNT)
    mld0 = _nft_counter(uplink.client, "mld", table="mldcount")
    _up(uplink, tmp_path, uplink.policy())
    for fam in ("-4", "-6"):  # someone deletes ksbpf's catch-all rule: main's default is back
        sh("ip", fam, "rule", "del", "pref", "10100", netns=uplink.client)
    f0 = uplink.far_count()
    assert send_udp(uplink.client, "192.0.2.1", 51820, 4) == 0
    assert send_udp(uplink.client, "192.0.2.1", 22, 3) == 0
    assert send_udp(uplink.client, "2001:db8:1::1", 443, 2) == 0
    assert send_udp(uplink.client, "192.0.2.1", 53, 5) == 0
    assert uplink.far_count() == f0
    assert _nft_counter(uplink.client, "drop_endpoint_unauthorized_ip4") == 4
    assert _nft_counter(uplink.client, "drop_no_tunnel_ip4") == 3
    # Our two, plus at most the MLD reports the kernel sent meanwhile (the only other IPv6 here).
    mld = _nft_counter(uplink.client, "mld", table="mldcount") - mld0
    assert 2 <= _nft_counter(uplink.client, "drop_no_tunnel_ip6") <= 2 + mld
    assert _nft_counter(uplink.client, "drop_dns_ip4") == 5


def test_up_is_idempotent_and_leak_free_under_traffic(uplink: Uplink, tmp_path: Path) -> None:
    flood = start_flood(uplink.client, [("203.0.113.9", 9, None), ("192.0.2.1", 9, None)])
    try:
        _up(uplink, tmp_path, uplink.policy())
        f0 = uplink.far_count()
        lan = '[lan]\nallow = true\nnetworks = ["198.18.0.0/15"]\n'
        for i in range(6):
            _up(uplink, tmp_path, uplink.policy(lan if i % 2 else ""))
        assert uplink.far_count() == f0, "re-running up while traffic flows leaked"
        assert uplink.tunnel_count() > 0
    finally:
        flood.kill()
        flood.wait()


def test_bad_policy_is_refused_and_changes_nothing(uplink: Uplink, tmp_path: Path) -> None:
    _up(uplink, tmp_path, uplink.policy())
    snapshot = lambda: (sh("nft", "-s", "list", "ruleset", netns=uplink.client).stdout, sh("ip", "rule", netns=uplink.client).stdout)  # noqa: E731
    before = snapshot()
    bad = tmp_path / "bad.toml"
    for text, needle in [
        ("[tunnel\n", "TOML syntax error"),
        (uplink.policy("[lan]\nnetworks = ['10.0.0.0/33']\n"), "lan.networks[0]"),
        (uplink.policy("surprise = 1\n"), "unknown key"),
        (uplink.policy().replace("51820/udp", "99999/udp"), "tunnel.endpoints[0]"),
        (uplink.policy(interfaces=["wg;drop"]), "tunnel.interfaces[0]"),
    ]:
        bad.write_text(text)
        r = ksctl("up", "--config", str(bad), netns=uplink.client, state_dir=str(tmp_path / "state"))
        assert r.returncode == 2, r.stderr
        assert str(bad) in r.stderr and needle in r.stderr
        assert snapshot() == before


def test_missing_tunnel_blocks_everything_until_it_appears(make_netns: NetnsFactory, tmp_path: Path) -> None:
    u = build_uplink(make_netns, tunnel=False)
    _up(u, tmp_path, u.policy())
    f0 = u.far_count()
    assert send_udp(u.client, "203.0.113.9", 9, 10) == 0  # blackhole: nowhere to go
    assert send_udp(u.client, "192.0.2.1", 9, 10) == 0
    assert u.far_count() == f0
    from tests.kernel.uplink import add_tunnel

    add_tunnel(u)
    _up(u, tmp_path, u.policy())  # the daemon does this on the link event
    t0 = u.tunnel_count()
    assert send_udp(u.client, "203.0.113.9", 9, 10) == 10
    assert u.tunnel_count() - t0 >= 10 and u.far_count() == f0


def test_pushed_route_neither_leaks_nor_leaves_the_tunnel(uplink: Uplink, tmp_path: Path) -> None:
    """TunnelVision: a more-specific route via the uplink, as DHCP option 121 pushes."""
    sh("ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1", netns=uplink.client)
    _up(uplink, tmp_path, uplink.policy())
    t0, f0 = uplink.tunnel_count(), uplink.far_count()
    assert send_udp(uplink.client, "203.0.113.9", 9, 20) == 20
    assert uplink.far_count() == f0
    assert uplink.tunnel_count() - t0 >= 20


def test_down_removes_only_its_own_rules(uplink: Uplink, tmp_path: Path) -> None:
    c = uplink.client
    sh("ip", "rule", "add", "not", "fwmark", "0xca6c", "table", "51820", netns=c)
    sh("ip", "rule", "add", "table", "main", "suppress_prefixlength", "0", netns=c)
    sh("nft", "add", "table", "inet", "other", netns=c)
    before_rules = sh("ip", "rule", netns=c).stdout
    _up(uplink, tmp_path, uplink.policy())
    assert "lookup 19283" in sh("ip", "rule", netns=c).stdout
    r = ksctl("down", netns=c, state_dir=str(tmp_path / "state"))
    assert r.returncode == 0, r.stderr
    assert sh("ip", "rule", netns=c).stdout == before_rules
    tables = sh("nft", "list", "tables", netns=c).stdout
    assert "inet other" in tables and "ksbpf" not in tables


def test_render_prints_what_up_applies(uplink: Uplink, tmp_path: Path) -> None:
    cfg = tmp_path / "policy.toml"
    cfg.write_text(uplink.policy())
    r = ksctl("render", "--platform", "linux", "--config", str(cfg), netns=uplink.client)
    assert r.returncode == 0, r.stderr
    rendered = json.loads(r.stdout.split("\n# policy routing")[0])
    _up(uplink, tmp_path, uplink.policy())
    live = json.loads(sh("nft", "-j", "list", "ruleset", netns=uplink.client).stdout)["nftables"]
    for kind in ("chain", "set", "rule", "counter"):
        want = sum(1 for c in rendered["nftables"] if kind in c.get("add", {}))
        have = sum(1 for o in live if kind in o and o[kind].get("table") == "ksbpf")
        assert want == have, kind
    routing = [line[2:] for line in r.stdout.splitlines() if line.startswith("# ip ")]
    assert any("lookup 19283" in line for line in routing)


def test_routed_namespace_leaks_nothing_with_the_tunnel_gone(uplink: Uplink, make_netns: NetnsFactory, tmp_path: Path) -> None:
    """A container or VM routed through this host (forward path): BPF never sees it."""
    c = uplink.client
    guest = make_netns("kg")
    veth(c, "guest0", guest, "eth0", ["172.30.0.1/24"], ["172.30.0.2/24"])
    sh("ip", "route", "add", "default", "via", "172.30.0.1", netns=guest)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=c)
    before = uplink.far_count()
    assert send_udp(guest, "192.0.2.1", 9, 5) == 5
    assert uplink.far_count() - before >= 5, "without ksbpf the guest's packets are forwarded out"

    _up(uplink, tmp_path, uplink.policy())
    t0, f0 = uplink.tunnel_count(), uplink.far_count()
    send_udp(guest, "203.0.113.9", 9, 10)
    assert uplink.tunnel_count() - t0 >= 10, "forwarded traffic goes through the tunnel"
    sh("ip", "link", "del", uplink.tun_if, netns=c)  # the tunnel vanishes
    send_udp(guest, "203.0.113.9", 9, 10)
    send_udp(guest, "192.0.2.1", 9, 10)
    for fam in ("-4", "-6"):  # and so does the routing layer
        sh("ip", fam, "rule", "del", "pref", "10100", netns=c)
    send_udp(guest, "203.0.113.9", 9, 10)
    assert uplink.far_count() == f0
    assert _nft_counter(c, "drop_forward_ip4") >= 10


def _exempt_sets(netns: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for family in ("inet", "netdev"):
        for o in json.loads(sh("nft", "-j", "list", "table", family, "ksbpf", netns=netns).stdout)["nftables"]:
            s = o.get("set")
            if s and s["name"].startswith("exempt_"):
                out[f"{family} {s['name']}"] = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
    return out


def test_exemption_changes_touch_only_their_elements_and_match_a_full_apply(uplink: Uplink, tmp_path: Path) -> None:
    """`ksctl exempt`/`unexempt` change only the elements of the exemption they name; what
    the kernel holds afterwards is exactly what a full `up` renders for the same
    exemptions, also after someone removed an element behind ksbpf's back."""
    c, state = uplink.client, str(tmp_path / "state")
    policy = uplink.policy('[[exempt]]\ncgroup = "system.slice/a.service"\nallow = ["tcp/443"]\nto = ["198.51.100.0/24"]\n')
    _up(uplink, tmp_path, policy)

    def run(*args: str) -> None:
        r = ksctl(*args, netns=c, state_dir=state)
        assert r.returncode == 0, r.stdout + r.stderr

    run("exempt", "--cgroup", "system.slice/b.service", "--allow", "udp/123", "--to", "192.0.2.0/24")
    run("exempt", "--cgroup", "system.slice/c.service", "--listen", "tcp/22", "--from", "10.0.0.0/8", "--from", "2001:db8::/32")
    # b changes (its old elements must go), the file's a is overridden, c goes
    run("exempt", "--cgroup", "system.slice/b.service", "--allow", "udp/123-124", "--to", "192.0.2.128/25")
    run("exempt", "--cgroup", "system.slice/a.service", "--listen", "tcp/8080")
    run("unexempt", "--cgroup", "system.slice/c.service")
    incremental = _exempt_sets(c)
    assert any("8080" in e for e in incremental["inet exempt_listen4"])
    assert not any("443" in e for e in incremental["inet exempt_allow4"]), "a's old grant is gone"
    assert not any("2001:db8::" in e for e in incremental["inet exempt_listen6"]), "c's IPv6 grant is gone"

    _up(uplink, tmp_path, policy)  # a full apply of the same policy and run-time exemptions
    assert _exempt_sets(c) == incremental

    # drift: one of a's elements removed by hand; changing a still leaves the sets exact
    elem = json.loads(next(e for e in incremental["inet exempt_listen4"] if "8080" in e))
    sh("nft", "-j", "-f", "-", netns=c, input=json.dumps({"nftables": [{"delete": {"element": {
        "family": "inet", "table": "ksbpf", "name": "exempt_listen4", "elem": [elem]}}}]}))
    assert _exempt_sets(c) != incremental
    run("unexempt", "--cgroup", "system.slice/a.service")  # a's run-time override goes: the file's a is back
    after = _exempt_sets(c)
    _up(uplink, tmp_path, policy)
    assert _exempt_sets(c) == after
    assert any("443" in e for e in after["inet exempt_allow4"]) and any("123" in e for e in after["inet exempt_allow4"])


def test_counters_read_from_the_kernel_match_nft(uplink: Uplink, tmp_path: Path) -> None:
    from ksbpf.linux.nftables import NftLayer

    _up(uplink, tmp_path, uplink.policy())
    send_udp(uplink.client, "203.0.113.9", 53, 6)  # dns via the tunnel to another resolver
    send_udp(uplink.client, "192.0.2.1", 51820, 3)  # unmarked to the endpoint: into the tunnel
    send_frames(uplink.client, uplink.up_if, 4)
    want: dict[str, tuple[int, int]] = {}
    for family in ("inet", "netdev"):
        for o in json.loads(sh("nft", "-j", "list", "counters", "table", family, "ksbpf", netns=uplink.client).stdout)["nftables"]:
            if "counter" in o:
                want[o["counter"]["name"]] = (o["counter"]["packets"], o["counter"]["bytes"])
    have = NftLayer(uplink.client).read_counters()
    assert have == want
    assert have["drop_dns_ip4"][0] == 6 and have["drop_raw_egress_ip4"][0] == 4
    sh("nft", "delete", "table", "netdev", "ksbpf", netns=uplink.client)
    # the netdev table's counter is gone; the inet table's unused one of that name remains
    assert NftLayer(uplink.client).read_counters()["drop_raw_egress_ip4"] == (0, 0)
    sh("nft", "delete", "table", "inet", "ksbpf", netns=uplink.client)
    assert NftLayer(uplink.client).read_counters() == {}


def test_a_policy_beyond_bpf_capacity_is_bad_input_and_changes_no_layer(uplink: Uplink, tmp_path: Path) -> None:
    """The BPF maps hold 65,536 endpoints: more is refused before nftables or routing
    change (exit 2), not applied by them and then refused by BPF (exit 3)."""
    _up(uplink, tmp_path, uplink.policy())
    snapshot = lambda: (sh("nft", "-s", "list", "ruleset", netns=uplink.client).stdout, sh("ip", "rule", netns=uplink.client).stdout)  # noqa: E731
    before = snapshot()
    endpoints = ", ".join(f'"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:51820/udp"' for i in range(65_537))
    cfg = tmp_path / "huge.toml"
    cfg.write_text(uplink.policy().replace('endpoints = ["192.0.2.1:51820/udp"]', f"endpoints = [{endpoints}]"))
    r = ksctl("up", "--config", str(cfg), netns=uplink.client, state_dir=str(tmp_path / "state"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "65537 endpoints, the BPF layer holds at most 65536" in r.stderr and str(cfg) in r.stderr
    assert snapshot() == before


def _stateless_ruleset(netns: str) -> str:
    return sh("nft", "-s", "list", "ruleset", netns=netns).stdout


def test_a_long_lived_layer_re_applies_by_set_changes_exactly_as_a_whole_apply(uplink: Uplink) -> None:
    """NftLayer (as ksbpfd holds it) takes a policy that differs in set contents only as
    element changes, and the kernel then holds exactly what a whole apply renders. Any
    other commit in the namespace since (someone's edit, even one element) makes the
    next apply whole again, which repairs the edit."""
    from ksbpf.linux.nftables import NftLayer
    from ksbpf.policy import loads_policy, merge_exemptions, parse_exemption

    c = uplink.client
    ex = '[[exempt]]\ncgroup = "system.slice/{n}.service"\nallow = ["tcp/443"]\nto = ["198.51.100.{i}/32"]\n'
    base = uplink.policy("".join(ex.format(n=f"s{i}", i=i) for i in range(5)))
    one_more = base.replace('endpoints = ["192.0.2.1:51820/udp"]', 'endpoints = ["192.0.2.1:51820/udp", "192.0.2.1:4500/udp"]')
    changed = one_more.replace("198.51.100.3/32", "203.0.113.3/32")
    changed += '[lan]\nallow = true\nnetworks = ["192.168.77.0/24"]\n'
    p_base, p_more, p_changed = (loads_policy(t) for t in (base, one_more, changed))
    layer = NftLayer(c)
    try:
        layer.apply(p_base)
        assert layer.last_apply == "whole"
        layer.apply(p_base)
        assert layer.last_apply == "unchanged"

        layer.apply(p_more)
        assert layer.last_apply == "changes"
        incremental = _stateless_ruleset(c)
        NftLayer(c).apply(p_more)  # a fresh layer knows nothing: a whole apply
        assert _stateless_ruleset(c) == incremental

        # that whole apply was a commit the long-lived layer did not make: whole again
        layer.apply(p_base)
        assert layer.last_apply == "whole"
        # lan sets and one exemption change; the skeleton differs (lan rules): whole
        layer.apply(p_changed)
        assert layer.last_apply == "whole"
        lan_only = changed.replace("192.168.77.0/24", "192.168.78.0/24")
        layer.apply(loads_policy(lan_only))
        assert layer.last_apply == "changes"
        incremental = _stateless_ruleset(c)
        NftLayer(c).apply(loads_policy(lan_only))
        assert _stateless_ruleset(c) == incremental

        # someone deletes one endpoint element: the next apply of the same policy repairs it
        layer.apply(loads_policy(lan_only))
        assert layer.last_apply == "whole"
        sh("nft", "delete", "element", "inet", "ksbpf", "endpoints4", "{ 192.0.2.1 . udp . 4500 }", netns=c)
        layer.apply(loads_policy(lan_only))
        assert layer.last_apply == "whole"
        assert _stateless_ruleset(c) == incremental
        # run-time exemption changes keep the layer's record: the next re-apply is by changes
        p_now = loads_policy(lan_only)
        extra = parse_exemption({"cgroup": "system.slice/rt.service", "allow": ["udp/123"]}, "<test>", "x")
        layer.change_exemptions(p_now, merge_exemptions(p_now, (extra,)))
        layer.apply(p_now)
        assert layer.last_apply == "changes"
        NftLayer(c).apply(p_now)
        assert _stateless_ruleset(c) == incremental
    finally:
        layer.reset()
