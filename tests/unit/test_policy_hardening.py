"""Policies that would quietly switch the kill switch off, or that other tools would read
differently, are refused naming the key."""

from __future__ import annotations

import pytest

from ksbpf.errors import PolicyError
from ksbpf.policy import loads_policy

BASE = '[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["198.51.100.7:51820/udp"]\nendpoint_mark = 0xca6c\n'


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ('endpoint_cgroups = ["/"]\n', "tunnel.endpoint_cgroups", "root cgroup"),
        ('endpoint_cgroups = ["system.slice/wg.service", "//"]\n', "tunnel.endpoint_cgroups", "root cgroup"),
        ('[lan]\nallow = true\nnetworks = ["0.0.0.0/0"]\n', "lan.networks", "every IPv4"),
        ('[lan]\nallow = true\nnetworks = ["192.168.1.0/24", "::/0"]\n', "lan.networks", "every IPv6"),
        ('[lan]\nnetworks = ["0.0.0.0/0"]\n', "lan.networks", "every IPv4"),  # armed for a later allow = true
        ('[metrics]\nlisten = "0.0.0.0:9477"\n', "metrics.listen", "listen_public"),
        ('[metrics]\nlisten = "[::]:9477"\n', "metrics.listen", "listen_public"),
        ('[metrics]\nlisten = "192.168.1.5:9477"\n', "metrics.listen", "listen_public"),
        ('[metrics]\nlisten = "127.0.0.1:９４７７"\n', "metrics.listen", "bad port"),
        ('[[exempt]]\ncgroup = "a.service"\nallow = ["tcp/２２"]\n', "exempt[0].allow", "bad port"),
        ('[[exempt]]\ncgroup = "a.service"\nlisten = ["udp/٥٣"]\n', "exempt[0].listen", "bad port"),
    ],
)
def test_refused_naming_the_key(extra: str, key: str, reason: str) -> None:
    with pytest.raises(PolicyError) as e:
        loads_policy(BASE + extra, "p.toml")
    assert key in str(e.value) and reason in str(e.value), str(e.value)


def test_non_ascii_digits_in_the_endpoint_mark_and_endpoint_port_are_refused() -> None:
    with pytest.raises(PolicyError, match=r"endpoint_mark.*ASCII"):
        loads_policy('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["198.51.100.7:51820/udp"]\nendpoint_mark = "٩"\n')
    with pytest.raises(PolicyError, match="endpoints"):
        loads_policy('[tunnel]\ninterfaces = ["wg0"]\nendpoints = ["198.51.100.7:５１８２０/udp"]\nendpoint_mark = 1\n')


def test_what_stays_allowed() -> None:
    p = loads_policy(BASE + 'endpoint_cgroups = ["system.slice/wg.service"]\n'
                     '[lan]\nallow = true\nnetworks = ["192.168.1.0/24", "fe80::/10"]\n'
                     '[metrics]\nlisten = "[::1]:9000"\n')
    assert p.tunnel.endpoint_cgroups == ("system.slice/wg.service",) and p.metrics.port == 9000
    public = loads_policy(BASE + '[metrics]\nlisten = "0.0.0.0:9477"\nlisten_public = true\n')
    assert public.metrics.host == "0.0.0.0"
