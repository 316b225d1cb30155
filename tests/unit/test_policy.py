from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ksbpf.errors import PolicyError
from ksbpf.marks import DEFAULT_ENDPOINT_MARK
from ksbpf.policy import PortSpec, load_policy, loads_policy, merge_exemptions, parse_exemption

HERE = Path(__file__).parent
MINIMAL = '[tunnel]\ninterfaces = ["wg0"]\n'


def test_full_example_parses_every_key() -> None:
    p = load_policy(HERE / "policies" / "full.toml")
    assert p.tunnel.interfaces == ("wg0", "tun*")
    assert [str(e) for e in p.tunnel.endpoints] == ["198.51.100.7:51820/udp", "[2001:db8::7]:51820/udp"]
    assert p.tunnel.endpoint_mark == 0xCA6C
    assert p.tunnel.endpoint_cgroups == ("system.slice/wg-quick@wg0.service",)
    assert p.dns.servers == (ipaddress.ip_address("10.64.0.1"), ipaddress.ip_address("fd00:64::1"))
    assert p.lan.allow and len(p.lan.networks) == 2
    assert p.ipv6.mode == "tunnel"
    assert p.bpf.cgroup == "/"
    assert p.metrics.listen == "127.0.0.1:9477"
    ssh, ntp = p.exemptions
    assert ssh.cgroup == "system.slice/sshd.service" and ssh.listen == (PortSpec("tcp", 22, 22),)
    assert ntp.allow == (PortSpec("udp", 123, 123),) and str(ntp.to[0]) == "162.159.200.1/32"


def test_minimal_policy_defaults() -> None:
    p = loads_policy(MINIMAL)
    assert p.tunnel.endpoints == () and p.lan.allow is False and p.ipv6.mode == "tunnel"
    assert p.metrics.listen == "127.0.0.1:9477"
    assert p.endpoint_mark == DEFAULT_ENDPOINT_MARK


def test_tunnel_interface_that_does_not_exist_yet_is_valid() -> None:
    assert loads_policy('[tunnel]\ninterfaces = ["wgdoesnotexist"]\n').tunnel.interfaces == ("wgdoesnotexist",)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[tunnel\ninterfaces = []", "", "TOML syntax error"),
        (MINIMAL + "[dns]\nservers = ['10.0.0.1']\nbogus = 1\n", "dns.bogus", "unknown key"),
        (MINIMAL + "colour = 'blue'\n", "tunnel.colour", "unknown key"),
        ("colour = 'blue'\n" + MINIMAL, "colour", "unknown key"),
        (MINIMAL + "[lan]\nallow = true\nnetworks = ['192.168.1.0/33']\n", "lan.networks[0]", "bad network"),
        (MINIMAL + "[lan]\nnetworks = ['192.168.1.1/24']\n", "lan.networks[0]", "host bits set"),
        ('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["192.0.2.1:70000/udp"]\nendpoint_mark = 1\n', "tunnel.endpoints[0]", "outside 1-65535"),
        ('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["192.0.2.1:51820/sctp"]\nendpoint_mark = 1\n', "tunnel.endpoints[0]", "unknown protocol"),
        ('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["192.0.2.1:51820/udp"]\n', "tunnel.endpoints", "endpoint_mark, endpoint_cgroups"),
        ('[tunnel]\ninterfaces = ["wg 0"]\n', "tunnel.interfaces[0]", "not a valid interface name"),
        ('[tunnel]\ninterfaces = ["wg\\"; drop"]\n', "tunnel.interfaces[0]", "not a valid interface name"),
        ('[tunnel]\ninterfaces = ["w*g"]\n', "tunnel.interfaces[0]", "not a valid interface name"),
        ('[tunnel]\ninterfaces = ["averyveryverylongname"]\n', "tunnel.interfaces[0]", "not a valid interface name"),
        ('[tunnel]\ninterfaces = ["l*"]\n', "tunnel.interfaces[0]", "loopback"),
        ('[tunnel]\ninterfaces = []\n', "tunnel.interfaces", "at least one"),
        ('[tunnel]\ninterfaces = ["wg0\\n"]\n', "tunnel.interfaces[0]", "not a valid interface name"),
        (MINIMAL + '[[exempt]]\ncgroup = "a.service\\n"\nallow = ["tcp/1"]\n', "exempt[0].cgroup", "characters outside"),
        (MINIMAL + "[dns]\nservers = ['fe80::1%;reboot']\n", "dns.servers[0]", "zone"),
        (MINIMAL + "[lan]\nnetworks = ['fe80::%eth0/64']\n", "lan.networks[0]", "zone"),
        ('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["[fe80::1%x]:1/udp"]\nendpoint_mark = 1\n', "tunnel.endpoints[0]", "zone"),
        ("[dns]\nservers = []\n", "tunnel", "is required"),
        ('[tunnel]\ninterfaces = ["wg0"]\nendpoint_mark = 0x4b000001\n', "tunnel.endpoint_mark", "reserves"),
        ('[tunnel]\ninterfaces = ["wg0"]\nendpoint_mark = true\n', "tunnel.endpoint_mark", "boolean"),
        (MINIMAL + "[ipv6]\nmode = 'sometimes'\n", "ipv6.mode", "'tunnel' or 'block'"),
        (MINIMAL + "[metrics]\nlisten = 'localhost:9477'\n", "metrics.listen", "not an IP address"),
        (MINIMAL + "[bpf]\ncgroup = '../escape'\n", "bpf.cgroup", "'..'"),
        (MINIMAL + "[[exempt]]\ncgroup = 'a/../../etc'\nallow = ['tcp/1']\n", "exempt[0].cgroup", "'..'"),
        (MINIMAL + "[[exempt]]\ncgroup = 'a.service'\nallow = ['icmp/1']\n", "exempt[0].allow[0]", "unknown protocol"),
        (MINIMAL + "[[exempt]]\ncgroup = 'a.service'\n", "exempt[0].allow", "at least one"),
        (MINIMAL + "[[exempt]]\ncgroup = '/'\nallow = ['tcp/1']\n", "exempt[0].cgroup", "root cgroup"),
        (MINIMAL + "[[exempt]]\ncgroup = 'a'\nallow = ['tcp/1']\n[[exempt]]\ncgroup = 'a'\nallow = ['tcp/2']\n", "exempt[1].cgroup", "twice"),
        (MINIMAL + "[[exempt]]\ncgroup = 'a'\nlisten = ['tcp/22']\nto = ['10.0.0.0/8']\n", "exempt[0].to", "'to' applies"),
    ],
)
def test_invalid_policies_name_key_and_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(PolicyError) as err:
        loads_policy(text, "p.toml")
    assert err.value.key == key, str(err.value)
    assert reason in str(err.value)
    assert str(err.value).startswith("p.toml: ")


def test_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")


def test_port_ranges_and_runtime_merge() -> None:
    ex = parse_exemption({"cgroup": "/a.service/", "allow": ["tcp/1000-2000", "udp/53"]}, "cli", "")
    assert ex.cgroup == "a.service"
    assert ex.allow == (PortSpec("tcp", 1000, 2000), PortSpec("udp", 53, 53))
    with pytest.raises(PolicyError, match="reversed"):
        parse_exemption({"cgroup": "a", "allow": ["tcp/9-1"]}, "cli", "")
    p = loads_policy(MINIMAL + "[[exempt]]\ncgroup = 'a'\nallow = ['tcp/1']\n")
    merged = merge_exemptions(p, (parse_exemption({"cgroup": "a", "allow": ["tcp/2"]}, "cli", ""),
                                  parse_exemption({"cgroup": "b", "allow": ["tcp/3"]}, "cli", "")))
    assert [(e.cgroup, str(e.allow[0])) for e in merged.exemptions] == [("a", "tcp/2"), ("b", "tcp/3")]
