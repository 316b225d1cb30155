"""The pure half of the BPF layer: what a policy becomes in the maps, byte for byte.
The kernel tests check the same layouts against the loaded maps."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from ksbpf.errors import BpfError
from ksbpf.linux.bpf import layer as bpf_layer
from ksbpf.linux.bpf import layout as bpf_layout
from ksbpf.linux.bpf import loader as bpf_loader
from ksbpf.linux.bpf import plan as bpf_plan
from ksbpf.linux.bpf import writes as bpf_writes
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids
from ksbpf.policy import Exemption, Policy, PortSpec, loads_policy, merge_exemptions
from ksbpf.render import bpf as bpf_render
from ksbpf.verdict import DROP_REASONS

BASE = """
[tunnel]
interfaces = ["wg0", "tun*"]
endpoints = ["198.51.100.7:51820/udp", "[2001:db8::7]:443/tcp"]
{tunnel}
[dns]
servers = ["10.64.0.1", "fd00::53"]
[lan]
{lan}
[ipv6]
mode = "{ipv6}"
[[exempt]]
cgroup = "system.slice/sshd.service"
listen = ["tcp/22"]
from = ["10.0.0.0/8"]
[[exempt]]
cgroup = "system.slice/systemd-timesyncd.service"
allow = ["udp/123", "tcp/6000-6010"]
"""


def policy(tunnel: str = "endpoint_mark = 0xca6c", lan: str = "allow = false", ipv6: str = "tunnel") -> Policy:
    return loads_policy(BASE.format(tunnel=tunnel, lan=lan, ipv6=ipv6))


def lpm_match(keys: list[bytes], probe: bytes) -> bool:
    """The kernel's LPM trie lookup: some key's first `prefixlen` data bits equal the probe's."""
    data = probe[4:]
    for k in keys:
        plen = struct.unpack_from("<I", k)[0]
        kd = k[4:]
        full, rest = divmod(plen, 8)
        if kd[:full] != data[:full]:
            continue
        if rest and (kd[full] ^ data[full]) >> (8 - rest):
            continue
        return True
    return False


# C struct sizes from bpf/killswitch.h (x86-64 / any LP64 ABI).
@pytest.mark.parametrize(
    ("what", "size"),
    [
        (bpf_render.tagged(1, bpf_render.endpoint_key(4, "udp", 1, ipaddress.ip_address("1.2.3.4"))), 24),
        (bpf_render.tagged(1, bpf_render.addr_key(ipaddress.ip_address("::1"))), 24),
        (bpf_render.port_key(2, "tcp", 22, 16), 12),
        (bpf_render.net_key(2, ipaddress.ip_network("10.0.0.0/8")), 28),
        (bpf_plan.Config(0, 0, 0, 0, 0, "").pack(), 192),
        (bpf_render.cgroup_key(1, 2), 16),
        (bpf_render.CgroupEntry().pack(), 16),
        (struct.pack(bpf_layout.DROP_KEY_FMT, 0, 0, 0), 16),
    ],
)
def test_key_sizes_match_the_c_structs(what: bytes, size: int) -> None:
    assert len(what) == size


def test_port_prefixes_cover_exactly_the_range() -> None:
    rng = random.Random(7)
    ranges = [(1, 65535), (22, 22), (6000, 6010), (1024, 2047), (65535, 65535), (1, 1)]
    for _ in range(200):
        a, b = sorted((rng.randint(1, 65535), rng.randint(1, 65535)))
        ranges.append((a, b))
    for first, last in ranges:
        blocks = bpf_render.port_prefixes(first, last)
        covered: set[int] = set()
        for port, plen in blocks:
            size = 1 << (16 - plen)
            assert port % size == 0, (first, last, port, plen)
            block = set(range(port, port + size))
            assert not covered & block
            covered |= block
        assert covered == set(range(first, last + 1)), (first, last)
        assert len(blocks) <= 30


@pytest.mark.parametrize("spec", [PortSpec("tcp", 6000, 6010), PortSpec("udp", 123, 123), PortSpec("tcp", 1, 65535)])
def test_port_keys_match_like_portspec_covers(spec: PortSpec) -> None:
    rules = bpf_render.ExemptionRules("x", 0, (spec,), (), (ipaddress.ip_network("0.0.0.0/0"),), ())
    keys, _ = bpf_render.rule_keys(rules, rule_set=5)
    sc = bpf_render.scope(5, bpf_layout.KIND_ALLOW)
    for proto in ("tcp", "udp"):
        for port in [*range(7000), 65535]:
            probe = bpf_render.port_key(sc, proto, port, 16)
            assert lpm_match(keys, probe) == spec.covers(proto, port), (proto, port)
    # Another rule set or kind never matches.
    assert not lpm_match(keys, bpf_render.port_key(bpf_render.scope(6, bpf_layout.KIND_ALLOW), spec.proto, spec.first, 16))
    assert not lpm_match(keys, bpf_render.port_key(bpf_render.scope(5, bpf_layout.KIND_LISTEN), spec.proto, spec.first, 16))


def test_net_keys_match_like_networks() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    rules = bpf_render.ExemptionRules("x", 0, (), (PortSpec("tcp", 22, 22),), (), nets)
    _, keys = bpf_render.rule_keys(rules, rule_set=3)
    sc = bpf_render.scope(3, bpf_layout.KIND_LISTEN)

    def probe(addr: str) -> bytes:
        a = ipaddress.ip_address(addr)
        return bpf_render.net_key(sc, ipaddress.ip_network(f"{a}/{a.max_prefixlen}"))

    assert lpm_match(keys, probe("10.1.2.3"))
    assert not lpm_match(keys, probe("11.0.0.1"))
    assert lpm_match(keys, probe("2001:db8::1"))
    assert not lpm_match(keys, probe("2001:db9::1"))
    # 10.0.0.0/8 must not match the IPv6 address 0a00::1 (family is part of the key).
    assert not lpm_match(keys, probe("a00::1"))


def test_render_flags_and_endpoint_marks() -> None:
    p = bpf_render.render(policy())
    assert p.flags == bpf_layout.F_ENDPOINT_MARK and p.endpoint_mark == 0xCA6C and p.endpoint_cgroup_mark == 0
    p = bpf_render.render(policy(tunnel='endpoint_cgroups = ["system.slice/wg.service"]', ipv6="block"))
    assert p.flags == bpf_layout.F_ENDPOINT_CGROUPS | bpf_layout.F_IPV6_BLOCK
    assert p.endpoint_mark == 0 and p.endpoint_cgroup_mark == DEFAULT_ENDPOINT_MARK
    # Both given: the VPN client sets its own mark; ksbpf does not mark its sockets.
    p = bpf_render.render(policy(tunnel='endpoint_mark = 0xca6c\nendpoint_cgroups = ["system.slice/wg.service"]'))
    assert p.flags == bpf_layout.F_ENDPOINT_MARK | bpf_layout.F_ENDPOINT_CGROUPS and p.endpoint_cgroup_mark == 0
    assert p.tunnel_patterns == ("wg0", "tun*")
    assert bpf_render.endpoint_key(4, "udp", 51820, ipaddress.ip_address("198.51.100.7")) in p.endpoints
    assert bpf_render.endpoint_key(6, "tcp", 443, ipaddress.ip_address("2001:db8::7")) in p.endpoints
    assert bpf_render.addr_key(ipaddress.ip_address("fd00::53")) in p.dns


def test_render_exemption_marks_are_the_shared_contract() -> None:
    pol = policy()
    ids = exemption_ids([e.cgroup for e in pol.exemptions])
    for r in bpf_render.render(pol).exemptions:
        assert r.mark == exempt_mark(ids[r.cgroup])
    ssh, ntp = bpf_render.render(pol).exemptions
    # `from` given for IPv4 only: IPv6 gets no networks (as Exemption.from_networks(6)).
    assert ssh.from_ == (ipaddress.ip_network("10.0.0.0/8"),)
    # No `to`: any network of both families.
    assert ntp.to == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def test_lan_networks_only_when_allowed() -> None:
    assert bpf_render.render(policy(lan='allow = false\nnetworks = ["192.168.1.0/24"]')).lan == ()
    lan = bpf_render.render(policy(lan='allow = true\nnetworks = ["192.168.1.0/24"]')).lan
    assert lan == (ipaddress.ip_network("192.168.1.0/24"),)
    assert bpf_render.lan_keys(lan, 7) == [bpf_render.net_key(bpf_render.scope(7, bpf_layout.KIND_ALLOW), lan[0])]


def test_cflags_carry_constants_never_policy() -> None:
    flags = bpf_loader.cflags("helper", None)
    for i, r in enumerate(DROP_REASONS):
        assert f"-DKS_R_{r.value.upper()}={i}" in flags
    assert not any("PIN" in f for f in flags)
    # Maps of policy hold two versions.
    assert f"-DKS_MAX_ENDPOINTS={2 * bpf_layout.MIN_ENDPOINT_TIER}" in flags
    assert f"-DKS_MAX_CGROUPS={2 * bpf_layout.MAX_CGROUPS}" in flags and f"-DKS_MAX_RULES={2 * bpf_layout.MAX_RULES}" in flags
    assert "-DKS_MAX_ENDPOINTS=131072" in bpf_loader.cflags("helper", None, bpf_render.Capacity(65536))
    pinned = bpf_loader.cflags("sk_storage", Path("/sys/fs/bpf/ksbpf/x"))
    assert '-DKS_DROPS_PIN="/sys/fs/bpf/ksbpf/x/drops"' in pinned
    assert "-DKS_NETNS_SK_STORAGE" in pinned and '-DKS_OWNERS_PIN="/sys/fs/bpf/ksbpf/x/owners"' in pinned


def test_config_roundtrip() -> None:
    c = bpf_plan.Config(123, 4, 99, bpf_layout.F_IPV6_BLOCK, 0xCA6C, "netns-lab1", version=7, endpoints_tag=6, dns_tag=2,
                   cgroups_tag=5, lan_rules=3, next_rules=40, tunnel_bank=1, digests=(1, 2, 3, 2**64 - 1),
                   build=bytes(range(32)))
    assert bpf_plan.Config.unpack(c.pack()) == c


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".", "..", "x" * 65, "sp ace"])
def test_instance_names_are_validated(name: str) -> None:
    with pytest.raises(BpfError):
        bpf_layer.BpfLayer(name)


def test_instance_name_per_netns() -> None:
    assert bpf_layout.instance_name(None) == "host"
    assert bpf_layout.instance_name("lab1") == "netns-lab1"
    bpf_layer.BpfLayer(bpf_layout.instance_name("lab1"))


def test_importing_the_layer_does_not_import_bcc() -> None:
    code = "import sys, ksbpf.linux.bpf.layer, ksbpf.linux.headers; print('bcc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_c_source_ships_as_package_data() -> None:
    d = bpf_loader._source_dir()
    assert (d / bpf_layout.SOURCE).is_file() and (d / "killswitch.h").is_file()
    text = (d / bpf_layout.SOURCE).read_text()
    for fn in bpf_layout.PROGS.values():
        assert f"int {fn}(" in text
    for m in bpf_layout.GEN_MAPS:
        assert f", {m}," in text or f"({m}," in text, m


# ---------------------------------------------------------------- capacity


def test_check_capacity_names_the_limit() -> None:
    p = bpf_render.render(policy())
    bpf_render.check_capacity(p)
    many = [bpf_render.endpoint_key(4, "udp", 1, ipaddress.ip_address("10.0.0.0") + i) for i in range(bpf_layout.MAX_ENDPOINTS)]
    bpf_render.check_capacity(dataclasses.replace(p, endpoints=tuple(many)))
    too_many = dataclasses.replace(p, endpoints=(*many, bpf_render.endpoint_key(4, "udp", 2, ipaddress.ip_address("1.1.1.1"))))
    with pytest.raises(BpfError) as refused:
        bpf_render.check_capacity(too_many)
    assert refused.value.reason == "tunnel.endpoints: 65537 endpoints, the BPF layer holds at most 65536"
    dns = tuple(bpf_render.addr_key(ipaddress.ip_address("10.0.0.0") + i) for i in range(bpf_layout.MAX_DNS + 1))
    with pytest.raises(BpfError, match=r"dns\.servers: 257 servers"):
        bpf_render.check_capacity(dataclasses.replace(p, dns=dns))
    # A full port range is one key; 1-65534 is 30 of them.
    wide = bpf_render.ExemptionRules("x", 0, (PortSpec("udp", 1, 65534),), (), (ipaddress.ip_network("0.0.0.0/0"),), ())
    n = bpf_layout.MAX_RULES // 30 + 1
    with pytest.raises(BpfError, match=rf"exempt: {n * 30} port rules"):
        bpf_render.check_capacity(dataclasses.replace(p, exemptions=(wide,) * n))


def test_endpoint_capacity_grows_in_powers_of_two() -> None:
    def plan(n: int) -> bpf_render.BpfPlan:
        keys = tuple(bpf_render.endpoint_key(4, "udp", 1, ipaddress.ip_address("10.0.0.0") + i) for i in range(n))
        return dataclasses.replace(bpf_render.render(policy()), endpoints=keys)

    assert bpf_render.Capacity.for_plan(plan(1)) == bpf_render.Capacity(1024)
    assert bpf_render.Capacity.for_plan(plan(1024)) == bpf_render.Capacity(1024)
    assert bpf_render.Capacity.for_plan(plan(1025)) == bpf_render.Capacity(2048)
    assert bpf_render.Capacity.for_plan(plan(10_000)).endpoints == 16384
    assert bpf_render.Capacity(16384).holds(plan(10_001)) and not bpf_render.Capacity(1024).holds(plan(1025))


def test_duplicate_endpoints_are_one_key() -> None:
    p = loads_policy(BASE.format(tunnel="endpoint_mark = 1", lan="", ipv6="tunnel").replace(
        'endpoints = ["198.51.100.7:51820/udp",', 'endpoints = ["198.51.100.7:51820/udp", "198.51.100.7:51820/udp",'))
    assert len(bpf_render.render(p).endpoints) == 2


# ---------------------------------------------------------------- policy versions


def header(**kw: object) -> bpf_plan.Config:
    base = bpf_plan.Config(11, 3, 99, 0, 0xCA6C, "inst", build=b"b" * 32)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def version(pol: Policy | None = None, ids: Mapping[str, int | None] | None = None,
            tunnels: frozenset[int] = frozenset({5}), **kw: object) -> bpf_plan.Version:
    plan = bpf_render.render(pol or policy())
    if ids is None:
        ids = {e.cgroup: 100 + i for i, e in enumerate(plan.exemptions)}
    return bpf_plan.Version(header=header(**kw), endpoints=plan.endpoints, dns=plan.dns, lan=plan.lan,
                       cgroups=bpf_plan.cgroup_wants(plan, ids), tunnels=tunnels)


def test_a_new_generation_writes_everything_as_version_one() -> None:
    step = bpf_plan.plan_step(None, frozenset(), version())
    c = step.config
    assert set(step.changed) == {"tunnels", "endpoints", "dns", "lan", "cgroups"}
    assert (c.version, c.endpoints_tag, c.dns_tag, c.cgroups_tag, c.tunnel_bank) == (1, 1, 1, 1, 0)
    assert (c.netns_cookie, c.generation, c.cgroup_id, c.endpoint_mark, c.instance) == (11, 3, 99, 0xCA6C, "inst")
    assert c.lan_rules == 0, "no LAN allowed: no rule set"
    assert sorted(step.exemption_rules.values()) == [1, 2] and c.next_rules == 3


def test_the_same_version_again_changes_nothing() -> None:
    live = bpf_plan.plan_step(None, frozenset(), version()).config
    step = bpf_plan.plan_step(live, frozenset({5}), version())
    assert step.changed == ()


def test_only_what_differs_gets_new_tags_ids_or_banks() -> None:
    live = bpf_plan.plan_step(None, frozenset(), version()).config
    more = policy().tunnel
    more_ep = dataclasses.replace(policy(), tunnel=dataclasses.replace(
        more, endpoints=(*more.endpoints, dataclasses.replace(more.endpoints[0], port=1))))
    step = bpf_plan.plan_step(live, frozenset({5}), version(more_ep))
    assert step.changed == ("endpoints",)
    c = step.config
    assert (c.version, c.endpoints_tag, c.dns_tag, c.cgroups_tag, c.next_rules) == (2, 2, 1, 1, live.next_rules)

    step = bpf_plan.plan_step(live, frozenset({5}), version(policy(ipv6="block"), flags=bpf_layout.F_IPV6_BLOCK))
    assert step.changed == ("config",) and step.config.flags == bpf_layout.F_IPV6_BLOCK

    step = bpf_plan.plan_step(live, frozenset({5}), version(tunnels=frozenset({5, 9})))
    assert step.changed == ("tunnels",) and step.config.tunnel_bank == 1 - live.tunnel_bank

    step = bpf_plan.plan_step(live, frozenset({5}), version(policy(lan='allow = true\nnetworks = ["192.168.1.0/24"]')))
    assert step.changed == ("lan",) and step.config.lan_rules == live.next_rules

    # A recreated cgroup (new id): the cgroups under the new tag, their rules under fresh ids.
    ids = {e.cgroup: 100 + i for i, e in enumerate(policy().exemptions)}
    ids["system.slice/sshd.service"] = 555
    step = bpf_plan.plan_step(live, frozenset({5}), version(ids=ids))
    assert step.changed == ("cgroups",)
    assert step.config.cgroups_tag == 2
    assert min(step.exemption_rules.values()) >= live.next_rules and 555 in step.exemption_rules


def test_an_exemptions_only_version_keeps_the_rest() -> None:
    live = bpf_plan.plan_step(None, frozenset(), version()).config
    plan = bpf_render.render(policy())
    step = bpf_plan.plan_step(live, frozenset({5}), bpf_plan.Version(cgroups=bpf_plan.cgroup_wants(plan, {})))
    assert step.changed == ("cgroups",)
    assert dataclasses.replace(step.config, version=live.version, cgroups_tag=live.cgroups_tag,
                               digests=live.digests) == live


def test_cgroup_wants_endpoint_and_exempt_in_one_cgroup() -> None:
    pol = policy(tunnel='endpoint_cgroups = ["system.slice/sshd.service"]')
    plan = bpf_render.render(pol)
    wants = bpf_plan.cgroup_wants(plan, {"system.slice/sshd.service": 7, "system.slice/systemd-timesyncd.service": None})
    assert list(wants) == [7]
    assert wants[7].endpoint and wants[7].mark == DEFAULT_ENDPOINT_MARK and wants[7].rules is not None


def test_build_digest_follows_what_the_build_depends_on(tmp_path: Path) -> None:
    from ksbpf.linux.headers import KernelSource

    src = tmp_path / "src"
    src.mkdir()
    (src / "killswitch.c").write_text("int x;")
    (src / "killswitch.h").write_text("")
    ks = KernelSource(Path("/h"), "prepared tree", "6.1.0")
    flags = bpf_loader.cflags("helper", None)
    d = bpf_loader.build_digest(src, flags, ks, "helper")
    assert d == bpf_loader.build_digest(src, list(flags), KernelSource(Path("/h"), "[bpf] kernel_source", "6.1.0"), "helper")
    assert d != bpf_loader.build_digest(src, bpf_loader.cflags("helper", None, bpf_render.Capacity(2048)), ks, "helper")
    assert d != bpf_loader.build_digest(src, flags, KernelSource(Path("/other"), "prepared tree", "6.1.0"), "helper")
    assert d != bpf_loader.build_digest(src, flags, ks, "sk_storage")
    (src / "killswitch.h").write_text("// changed")
    assert d != bpf_loader.build_digest(src, flags, ks, "helper")


# ---------------------------------------------------------------- in-place paths (plan_step with held)


def held_of(step: bpf_plan.Step, want: bpf_plan.Version, **kw: object) -> bpf_plan.Held:
    """What the maps hold once `step` (a versioned or new one) wrote `want`."""
    assert want.endpoints is not None and want.dns is not None and want.cgroups is not None
    cgroups = {cid: w.entry(step.exemption_rules.get(cid, 0)).pack() for cid, w in want.cgroups.items()}
    base = bpf_plan.Held(frozenset(want.endpoints), frozenset(want.dns), cgroups, step.config.next_rules)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def with_endpoints(pol: Policy, *extra: str) -> Policy:
    from ksbpf.policy import parse_endpoint

    t = pol.tunnel
    return dataclasses.replace(pol, tunnel=dataclasses.replace(t, endpoints=(*t.endpoints, *map(parse_endpoint, extra))))


def test_one_endpoint_more_is_a_delta_under_the_live_tag() -> None:
    first = bpf_plan.plan_step(None, frozenset(), version())
    live, held = first.config, held_of(first, version())
    more = version(with_endpoints(policy(), "192.0.2.9:1194/udp"))
    step = bpf_plan.plan_step(live, frozenset({5}), more, held)
    assert (step.path, step.changed) == (bpf_plan.StepPath.DELTA, ("endpoints",))
    new_key = bpf_render.endpoint_key(4, "udp", 1194, ipaddress.ip_address("192.0.2.9"))
    assert step.delta == {"endpoints": ((new_key,), ())}
    assert step.describe() == ("endpoints (delta +1 -0)",)
    # Tags stay; only bookkeeping differs, so the live slot may be rewritten in place.
    c = step.config
    assert dataclasses.replace(c, version=live.version, digests=live.digests) == live
    assert c.digests[0] == more.digest("endpoints") and c.version == live.version + 1


def test_delta_is_against_what_the_map_holds_and_repairs_drift() -> None:
    first = bpf_plan.plan_step(None, frozenset(), version())
    live = first.config
    gone = bpf_render.endpoint_key(4, "udp", 51820, ipaddress.ip_address("198.51.100.7"))
    stray = bpf_render.endpoint_key(4, "udp", 9, ipaddress.ip_address("203.0.113.1"))
    held = held_of(first, version(), endpoints=frozenset({stray} | set(version().endpoints or ()) - {gone}))
    # The same policy, but the map lost one key and gained another: a delta puts it right.
    step = bpf_plan.plan_step(live, frozenset({5}), version(), held)
    assert (step.path, step.changed) == (bpf_plan.StepPath.DELTA, ("endpoints",))
    assert step.delta == {"endpoints": ((gone,), (stray,))}
    # Without a read of the map, the digest alone says nothing changed.
    assert bpf_plan.plan_step(live, frozenset({5}), version()).changed == ()


def test_dns_and_endpoints_together_are_one_delta() -> None:
    first = bpf_plan.plan_step(None, frozenset(), version())
    pol = with_endpoints(policy(), "192.0.2.9:1194/udp")
    pol = dataclasses.replace(pol, dns=dataclasses.replace(pol.dns, servers=pol.dns.servers[:1]))
    step = bpf_plan.plan_step(first.config, frozenset({5}), version(pol), held_of(first, version()))
    assert step.path == bpf_plan.StepPath.DELTA and set(step.delta) == {"endpoints", "dns"}
    assert step.delta["dns"] == ((), (bpf_render.addr_key(ipaddress.ip_address("fd00::53")),))


@pytest.mark.parametrize("other", ["config", "tunnels", "cgroups", "lan"])
def test_a_set_change_with_anything_else_is_versioned(other: str) -> None:
    first = bpf_plan.plan_step(None, frozenset(), version())
    pol = with_endpoints(policy(), "192.0.2.9:1194/udp")
    kw: dict[str, object] = {}
    if other == "config":
        pol, kw = dataclasses.replace(pol, ipv6=dataclasses.replace(pol.ipv6, mode="block")), {"flags": bpf_layout.F_IPV6_BLOCK}
    elif other == "tunnels":
        kw = {"tunnels": frozenset({5, 6})}
    elif other == "cgroups":
        kw = {"ids": {e.cgroup: 200 + i for i, e in enumerate(pol.exemptions)}}
    else:
        pol = dataclasses.replace(pol, lan=dataclasses.replace(pol.lan, allow=True,
                                                              networks=(ipaddress.ip_network("192.168.1.0/24"),)))
    step = bpf_plan.plan_step(first.config, frozenset({5}), version(pol, **kw), held_of(first, version()))  # type: ignore[arg-type]
    assert step.path == bpf_plan.StepPath.VERSIONED and "endpoints" in step.changed and other in step.changed
    assert step.config.endpoints_tag == step.config.version, "the endpoints under the new version's tag"


def exempt_policy(n: int, extra: str = "") -> Policy:
    rules = "".join(f'[[exempt]]\ncgroup = "s/e{i}"\nallow = ["udp/{1000 + i}"]\n' for i in range(n))
    return loads_policy(f'[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["192.0.2.1:1/udp"]\nendpoint_mark = 1\n{rules}{extra}')


def test_exempting_one_cgroup_replaces_one_entry_under_a_fresh_rule_set() -> None:
    pol = exempt_policy(50)
    ids = {f"s/e{i}": 1000 + i for i in range(60)}
    first = bpf_plan.plan_step(None, frozenset(), version(pol, ids=ids))
    held = held_of(first, version(pol, ids=ids), reserved_rules=first.config.next_rules + 3)
    one_more = pol.with_exemptions((*pol.exemptions, *exempt_policy(51).exemptions[50:]))
    want = bpf_plan.Version(cgroups=bpf_plan.cgroup_wants(bpf_render.render(one_more, sets=False), ids))
    step = bpf_plan.plan_step(first.config, frozenset(), want, held)
    assert (step.path, step.changed, step.cgroup) == (bpf_plan.StepPath.ONE_CGROUP, ("cgroups",), 1050)
    # Past what a write that died may have used (the reserve entry), never reused.
    assert step.exemption_rules == {1050: first.config.next_rules + 3}
    assert step.config.next_rules == first.config.next_rules + 4
    assert step.config.cgroups_tag == first.config.cgroups_tag
    # And unexempting it again: one entry, no rule set.
    held2 = dataclasses.replace(held, cgroups={**held.cgroups, 1050: want.cgroups[1050].entry(99).pack()})  # type: ignore[index, dict-item]
    back = bpf_plan.plan_step(step.config, frozenset(), bpf_plan.Version(cgroups=bpf_plan.cgroup_wants(bpf_render.render(pol), ids)), held2)
    assert (back.path, back.cgroup, back.exemption_rules) == (bpf_plan.StepPath.ONE_CGROUP, 1050, {})


def test_a_changed_grant_of_one_cgroup_is_one_entry_and_a_mark_only_change_keeps_its_rules() -> None:
    pol = exempt_policy(5)
    ids = {f"s/e{i}": 1000 + i for i in range(5)}
    first = bpf_plan.plan_step(None, frozenset(), version(pol, ids=ids))
    held = held_of(first, version(pol, ids=ids))
    narrower = exempt_policy(5).exemptions
    narrower = (*narrower[:2], dataclasses.replace(narrower[2], allow=(PortSpec("udp", 7, 7),)), *narrower[3:])
    step = bpf_plan.plan_step(first.config, frozenset(), bpf_plan.Version(cgroups=bpf_plan.cgroup_wants(
        bpf_render.render(pol.with_exemptions(narrower)), ids)), held)
    assert (step.path, step.cgroup) == (bpf_plan.StepPath.ONE_CGROUP, 1002)
    assert step.exemption_rules[1002] >= first.config.next_rules
    # The same grant, only the endpoint flag: its entry changes, its rule set stays.
    plan = bpf_render.render(pol)
    wants = bpf_plan.cgroup_wants(plan, ids)
    wants[1003] = dataclasses.replace(wants[1003], endpoint=True)
    step = bpf_plan.plan_step(first.config, frozenset(), bpf_plan.Version(cgroups=wants), held)
    assert (step.path, step.cgroup) == (bpf_plan.StepPath.ONE_CGROUP, 1003)
    assert step.exemption_rules == {1003: first.exemption_rules[1003]}


def test_two_cgroups_at_once_are_versioned() -> None:
    pol = exempt_policy(5)
    ids = {f"s/e{i}": 1000 + i for i in range(5)}
    first = bpf_plan.plan_step(None, frozenset(), version(pol, ids=ids))
    held = held_of(first, version(pol, ids=ids))
    fewer = bpf_plan.Version(cgroups=bpf_plan.cgroup_wants(bpf_render.render(pol.with_exemptions(pol.exemptions[2:])), ids))
    step = bpf_plan.plan_step(first.config, frozenset(), fewer, held)
    assert step.path == bpf_plan.StepPath.VERSIONED and step.config.cgroups_tag == step.config.version
    assert step.describe() == ("cgroups (versioned)",)
    # An entry gone from the map behind our back and one real change: two, versioned too.
    lost = dict(held.cgroups)  # type: ignore[arg-type]
    del lost[1004]
    step = bpf_plan.plan_step(first.config, frozenset(), bpf_plan.Version(cgroups=bpf_plan.cgroup_wants(
        bpf_render.render(pol.with_exemptions(pol.exemptions[1:])), ids)), dataclasses.replace(held, cgroups=lost))
    assert step.path == bpf_plan.StepPath.VERSIONED


def test_entries_written_by_an_older_loader_are_not_trusted() -> None:
    """Entries without a rules digest (pad 0) all differ: the first write re-tags them."""
    pol = exempt_policy(3)
    ids = {f"s/e{i}": 1000 + i for i in range(3)}
    first = bpf_plan.plan_step(None, frozenset(), version(pol, ids=ids))
    held = held_of(first, version(pol, ids=ids))
    old = {cid: dataclasses.replace(bpf_render.CgroupEntry.unpack(v), digest=0).pack() for cid, v in held.cgroups.items()}  # type: ignore[union-attr]
    assert bpf_plan.cgroups_changed(old, version(pol, ids=ids).cgroups) == [1000, 1001, 1002]  # type: ignore[arg-type]
    assert bpf_plan.cgroups_changed(held.cgroups, version(pol, ids=ids).cgroups) == []  # type: ignore[arg-type]


def test_rules_digest_follows_the_keys_and_render_reuses_exemptions() -> None:
    pol = exempt_policy(3)
    a, b = bpf_render.render(pol).exemptions, bpf_render.render(pol).exemptions
    assert all(x is y for x, y in zip(a, b, strict=True)), "the same Exemption objects render to the same rules"
    fresh = bpf_render.render(exempt_policy(3)).exemptions
    assert [r.digest for r in fresh] == [r.digest for r in a] and fresh[0] is not a[0]
    assert len({r.digest for r in a}) == 3
    wider = dataclasses.replace(a[0], allow=(PortSpec("udp", 1000, 1001),))
    assert wider.digest != a[0].digest
    assert a[0].counts == (1, 2)  # one port, any network of both families


def test_resolve_cgroups_reads_a_crowded_directory_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(bpf_writes, "cgroup2_mount", lambda: tmp_path)
    for i in range(40):
        (tmp_path / "s" / f"e{i}").mkdir(parents=True)
    (tmp_path / "s" / "file").write_text("")
    (tmp_path / "lone").mkdir()
    names = [f"s/e{i}" for i in range(45)] + ["s/file", "lone", "nope/x"]
    rules = "".join(f'[[exempt]]\ncgroup = "{n}"\nallow = ["udp/1"]\n' for n in names)
    plan = bpf_render.render(loads_policy(f'[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["192.0.2.1:1/udp"]\nendpoint_mark = 1\n{rules}'))
    got = bpf_writes.resolve_cgroups(plan)
    want: dict[str, int | None] = {e.cgroup: None for e in plan.exemptions}
    for e in plan.exemptions:
        p = tmp_path / e.cgroup.strip("/")
        if p.is_dir():
            want[e.cgroup] = os.stat(p).st_ino
    assert got == want
    assert got["s/e0"] is not None and got["s/e44"] is None and got["s/file"] is None and got["lone"] is not None


# ---------------------------------------------------------------- run-time exemption changes (select_change)


def indexed(pol: Policy) -> bpf_plan.ExemptionIndex:
    return bpf_plan.ExemptionIndex.build(pol.exemptions, bpf_render.render(pol, sets=False).exemptions)


def one(path: str, port: int = 443) -> Exemption:
    return Exemption(path, allow=(PortSpec("tcp", port, port),))


def test_diff_exemptions_finds_the_one_that_differs_by_identity_then_equality() -> None:
    pol = exempt_policy(20)
    ex = pol.exemptions
    assert bpf_plan.diff_exemptions(ex, ex) == [] and bpf_plan.diff_exemptions(ex, tuple(ex)) == []
    copies = tuple(dataclasses.replace(e) for e in ex)  # equal, not identical: unchanged
    assert bpf_plan.diff_exemptions(ex, copies) == []
    new = one("s/e10a")
    added = merge_exemptions(pol, (new,)).exemptions
    assert bpf_plan.diff_exemptions(ex, added) == [(None, new)]
    assert bpf_plan.diff_exemptions(added, ex) == [(new, None)]
    changed = merge_exemptions(pol, (one("s/e3"),)).exemptions
    assert bpf_plan.diff_exemptions(ex, changed) == [(ex[[e.cgroup for e in ex].index("s/e3")], one("s/e3"))]
    # Out of order, it is found path by path; more than one change is None (or all, with a limit).
    assert bpf_plan.diff_exemptions(ex, (new, *ex)) == [(None, new)]
    two = merge_exemptions(pol, (new, one("s/e3"))).exemptions
    assert bpf_plan.diff_exemptions(ex, two) is None
    assert bpf_plan.diff_exemptions(ex, two, limit=2) is not None and len(bpf_plan.diff_exemptions(ex, two, limit=2) or ()) == 2
    assert bpf_plan.diff_exemptions(ex, (*ex[1:], new)) is None  # one removed, another added


def test_select_change_takes_one_exemption_and_computes_its_mark_and_capacity() -> None:
    pol = exempt_policy(20)
    idx = indexed(pol)
    new = one("s/new")
    after = merge_exemptions(pol, (new,))
    c = bpf_plan.select_change(pol, after, idx)
    assert isinstance(c, bpf_plan.ExemptionChange)
    ids = exemption_ids([e.cgroup for e in after.exemptions])
    assert (c.path, c.old, c.new, c.id) == ("s/new", None, new, ids["s/new"])
    assert c.new_rules is not None and c.new_rules.mark == exempt_mark(ids["s/new"])
    plan = bpf_render.render(after, sets=False)
    assert (c.cgroups, c.ports, c.nets) == (21, sum(r.counts[0] for r in plan.exemptions),
                                            sum(r.counts[1] for r in plan.exemptions) + len(plan.lan))
    # After it is written the index is after's, as built anew.
    idx.apply(c, after.exemptions)
    assert idx == indexed(after)
    back = bpf_plan.select_change(after, pol, idx)
    assert isinstance(back, bpf_plan.ExemptionChange) and (back.old, back.new) == (new, None)
    idx.apply(back, pol.exemptions)
    assert idx == indexed(pol)
    assert bpf_plan.select_change(pol, pol.with_exemptions(tuple(pol.exemptions)), idx) is None


@pytest.mark.parametrize("why", ["endpoints", "lan", "two", "no index", "stale index", "odd path", "duplicate"])
def test_select_change_falls_back_when_unsure(why: str) -> None:
    pol = exempt_policy(5)
    idx: bpf_plan.ExemptionIndex | None = indexed(pol)
    after = merge_exemptions(pol, (one("s/new"),))
    before = pol
    if why == "endpoints":
        after = dataclasses.replace(after, tunnel=dataclasses.replace(after.tunnel, endpoint_cgroups=("s/ep",)))
    elif why == "lan":
        after = merge_exemptions(exempt_policy(5, '[lan]\nallow = true\nnetworks = ["10.0.0.0/8"]\n'), (one("s/new"),))
    elif why == "two":
        after = merge_exemptions(pol, (one("s/new"), one("s/e1")))
    elif why == "no index":
        idx = None
    elif why == "stale index":
        before = merge_exemptions(pol, (one("s/e2"),))  # not what the index says was written
        after = merge_exemptions(before, (one("s/new"),))
    elif why == "odd path":
        after = pol.with_exemptions((*pol.exemptions, one("/s/new/")))
    elif why == "duplicate":
        after = pol.with_exemptions((*pol.exemptions, one("s/e1")))
    assert isinstance(bpf_plan.select_change(before, after, idx), str)


def test_incremental_exemption_ids_agree_with_exemption_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny id space, collisions and probes everywhere: whenever select_change keeps
    the fast path, every other exemption keeps its id, as exemption_ids says for `after`."""
    from ksbpf import marks

    monkeypatch.setattr(marks, "EXEMPT_ID_MASK", 31)
    rng = random.Random(7)
    kept = fell_back = 0
    for _ in range(300):
        paths = sorted(rng.sample([f"a/c{i}" for i in range(40)], rng.randint(1, 20)))
        pol = exempt_policy(0).with_exemptions(tuple(one(p) for p in paths))
        idx = indexed(pol)
        assert all(marks.exemption_ids(paths)[p] == i for p, i in idx.ids.items())
        if rng.random() < 0.5:
            path = rng.choice([f"a/c{i}" for i in range(40) if f"a/c{i}" not in paths] or paths)
            after = merge_exemptions(pol, (one(path, 80),))
        else:
            path = rng.choice(paths)
            after = pol.with_exemptions(tuple(e for e in pol.exemptions if e.cgroup != path))
        c = bpf_plan.select_change(pol, after, idx)
        if isinstance(c, str):
            assert "marks move" in c
            fell_back += 1
            continue
        assert c is not None
        new_ids = marks.exemption_ids([e.cgroup for e in after.exemptions])
        assert all(new_ids[p] == idx.ids[p] for p in new_ids if p != path)
        if c.new is not None:
            assert new_ids[path] == c.id
        idx.apply(c, after.exemptions)
        assert idx == indexed(after)
        kept += 1
    assert kept > 50 and fell_back > 10


def test_the_cgroups_digest_changes_by_one_entry_as_a_whole_digest_would() -> None:
    pol = exempt_policy(30)
    ids: dict[str, int | None] = {f"s/e{i}": 500 + i for i in range(30)}
    ids["s/new"] = 999
    wants = bpf_plan.cgroup_wants(bpf_render.render(pol, sets=False), ids)
    after = merge_exemptions(pol, (one("s/new"), ))
    wants2 = bpf_plan.cgroup_wants(bpf_render.render(after, sets=False), ids)
    d1 = bpf_plan.Version(cgroups=wants).digest("cgroups")
    d2 = bpf_plan.Version(cgroups=wants2).digest("cgroups")
    assert d1 is not None and d2 is not None
    assert bpf_plan.cgroups_digest_changed(d1, 999, None, wants2[999]) == d2
    assert bpf_plan.cgroups_digest_changed(d2, 999, wants2[999], None) == d1
    changed = merge_exemptions(pol, (one("s/e4", 80),))
    wants3 = bpf_plan.cgroup_wants(bpf_render.render(changed, sets=False), ids)
    assert bpf_plan.cgroups_digest_changed(d1, 504, wants[504], wants3[504]) == bpf_plan.Version(cgroups=wants3).digest("cgroups")


def test_change_want_is_cgroup_wants_for_one_path() -> None:
    pol = exempt_policy(2, '[[exempt]]\ncgroup = "s/ep"\nallow = ["tcp/1"]\n')
    pol = dataclasses.replace(pol, tunnel=dataclasses.replace(pol.tunnel, endpoint_cgroups=("s/ep", "s/ep2"),
                                                              endpoint_mark=None))
    plan = bpf_render.render(pol, sets=False)
    ids: dict[str, int | None] = {"s/e0": 1, "s/e1": 2, "s/ep": 3, "s/ep2": 4}
    wants = bpf_plan.cgroup_wants(plan, ids)
    mark = bpf_render.endpoint_cgroup_mark(pol)
    by_path = {r.cgroup: r for r in plan.exemptions}
    for path, cid in ids.items():
        assert bpf_plan.change_want(by_path.get(path), path in pol.tunnel.endpoint_cgroups, mark) == wants.get(cid or 0)
