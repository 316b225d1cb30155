"""The pure half of the BPF layer: what a policy becomes in the maps, byte for byte.
The kernel tests check the same layouts against the loaded maps."""

from __future__ import annotations

import ipaddress
import random
import struct
import subprocess
import sys

import pytest

from ksbpf.errors import BpfError
from ksbpf.linux import bpf
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids
from ksbpf.policy import Policy, PortSpec, loads_policy
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
        (bpf.endpoint_key(4, "udp", 1, ipaddress.ip_address("1.2.3.4")), 20),
        (bpf.addr_key(ipaddress.ip_address("::1")), 20),
        (bpf.port_key(2, "tcp", 22, 16), 12),
        (bpf.net_key(2, ipaddress.ip_network("10.0.0.0/8")), 28),
        (struct.pack(bpf.CONFIG_FMT, 0, 0, 0, 0, 0, b""), 96),
        (struct.pack(bpf.CGROUP_FMT, 0, 0, 0, 0), 16),
        (struct.pack(bpf.DROP_KEY_FMT, 0, 0, 0), 16),
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
        blocks = bpf.port_prefixes(first, last)
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
    rules = bpf.ExemptionRules("x", 0, (spec,), (), (ipaddress.ip_network("0.0.0.0/0"),), ())
    keys, _ = bpf.rule_keys(rules, slot=5)
    sc = bpf.scope(5, bpf.KIND_ALLOW)
    for proto in ("tcp", "udp"):
        for port in [*range(7000), 65535]:
            probe = bpf.port_key(sc, proto, port, 16)
            assert lpm_match(keys, probe) == spec.covers(proto, port), (proto, port)
    # Another slot or kind never matches.
    assert not lpm_match(keys, bpf.port_key(bpf.scope(6, bpf.KIND_ALLOW), spec.proto, spec.first, 16))
    assert not lpm_match(keys, bpf.port_key(bpf.scope(5, bpf.KIND_LISTEN), spec.proto, spec.first, 16))


def test_net_keys_match_like_networks() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    rules = bpf.ExemptionRules("x", 0, (), (PortSpec("tcp", 22, 22),), (), nets)
    _, keys = bpf.rule_keys(rules, slot=3)
    sc = bpf.scope(3, bpf.KIND_LISTEN)

    def probe(addr: str) -> bytes:
        a = ipaddress.ip_address(addr)
        return bpf.net_key(sc, ipaddress.ip_network(f"{a}/{a.max_prefixlen}"))

    assert lpm_match(keys, probe("10.1.2.3"))
    assert not lpm_match(keys, probe("11.0.0.1"))
    assert lpm_match(keys, probe("2001:db8::1"))
    assert not lpm_match(keys, probe("2001:db9::1"))
    # 10.0.0.0/8 must not match the IPv6 address 0a00::1 (family is part of the key).
    assert not lpm_match(keys, probe("a00::1"))


def test_render_flags_and_endpoint_marks() -> None:
    p = bpf.render(policy())
    assert p.flags == bpf.F_ENDPOINT_MARK and p.endpoint_mark == 0xCA6C and p.endpoint_cgroup_mark == 0
    p = bpf.render(policy(tunnel='endpoint_cgroups = ["system.slice/wg.service"]', ipv6="block"))
    assert p.flags == bpf.F_ENDPOINT_CGROUPS | bpf.F_IPV6_BLOCK
    assert p.endpoint_mark == 0 and p.endpoint_cgroup_mark == DEFAULT_ENDPOINT_MARK
    # Both given: the VPN client sets its own mark; ksbpf does not mark its sockets.
    p = bpf.render(policy(tunnel='endpoint_mark = 0xca6c\nendpoint_cgroups = ["system.slice/wg.service"]'))
    assert p.flags == bpf.F_ENDPOINT_MARK | bpf.F_ENDPOINT_CGROUPS and p.endpoint_cgroup_mark == 0
    assert p.tunnel_patterns == ("wg0", "tun*")
    assert bpf.endpoint_key(4, "udp", 51820, ipaddress.ip_address("198.51.100.7")) in p.endpoints
    assert bpf.endpoint_key(6, "tcp", 443, ipaddress.ip_address("2001:db8::7")) in p.endpoints
    assert bpf.addr_key(ipaddress.ip_address("fd00::53")) in p.dns


def test_render_exemption_marks_are_the_shared_contract() -> None:
    pol = policy()
    ids = exemption_ids([e.cgroup for e in pol.exemptions])
    for r in bpf.render(pol).exemptions:
        assert r.mark == exempt_mark(ids[r.cgroup])
    ssh, ntp = bpf.render(pol).exemptions
    # `from` given for IPv4 only: IPv6 gets no networks (as Exemption.from_networks(6)).
    assert ssh.from_ == (ipaddress.ip_network("10.0.0.0/8"),)
    # No `to`: any network of both families.
    assert ntp.to == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def test_lan_keys_only_when_allowed() -> None:
    assert bpf.render(policy(lan='allow = false\nnetworks = ["192.168.1.0/24"]')).lan == ()
    lan = bpf.render(policy(lan='allow = true\nnetworks = ["192.168.1.0/24"]')).lan
    assert lan == (bpf.net_key(bpf.SCOPE_LAN, ipaddress.ip_network("192.168.1.0/24")),)


def test_cflags_carry_constants_never_policy() -> None:
    flags = bpf.cflags("helper", None)
    for i, r in enumerate(DROP_REASONS):
        assert f"-DKS_R_{r.value.upper()}={i}" in flags
    assert not any("PIN" in f for f in flags)
    from pathlib import Path

    pinned = bpf.cflags("sk_storage", Path("/sys/fs/bpf/ksbpf/x"))
    assert '-DKS_DROPS_PIN="/sys/fs/bpf/ksbpf/x/drops"' in pinned
    assert "-DKS_NETNS_SK_STORAGE" in pinned and '-DKS_SK_NETNS_PIN="/sys/fs/bpf/ksbpf/x/sk_netns"' in pinned


def test_config_roundtrip() -> None:
    c = bpf.Config(123, 4, 99, bpf.F_IPV6_BLOCK, 0xCA6C, "netns-lab1")
    assert bpf.Config.unpack(c.pack()) == c


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".", "..", "x" * 65, "sp ace"])
def test_instance_names_are_validated(name: str) -> None:
    with pytest.raises(BpfError):
        bpf.BpfLayer(name)


def test_instance_name_per_netns() -> None:
    assert bpf.instance_name(None) == "host"
    assert bpf.instance_name("lab1") == "netns-lab1"
    bpf.BpfLayer(bpf.instance_name("lab1"))


def test_importing_the_layer_does_not_import_bcc() -> None:
    code = "import sys, ksbpf.linux.bpf, ksbpf.linux.headers; print('bcc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_c_source_ships_as_package_data() -> None:
    d = bpf._source_dir()
    assert (d / bpf.SOURCE).is_file() and (d / "killswitch.h").is_file()
    text = (d / bpf.SOURCE).read_text()
    for fn in bpf.PROGS.values():
        assert f"int {fn}(" in text
    for m in bpf.GEN_MAPS:
        assert f", {m}," in text or f"({m}," in text, m
