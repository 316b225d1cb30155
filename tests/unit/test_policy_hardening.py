"""Policies that would quietly switch the kill switch off, or that other tools would read
differently, are refused naming the key."""

from __future__ import annotations

import os
from pathlib import Path

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


# ------------------------------------------------------------------ the file and what it names


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need files owned by root")
def test_every_ancestor_directory_must_be_roots_alone(tmp_path: Path) -> None:
    from ksbpf.policy_file import read_policy_file

    deep = tmp_path / "open" / "etc"
    deep.mkdir(parents=True)
    p = _write(deep / "policy.toml", BASE)
    assert read_policy_file(p)[0].tunnel.interfaces == ("wg0",)
    (tmp_path / "open").chmod(0o777)  # a grandparent anyone can write: they can swap "etc"
    with pytest.raises(PolicyError, match=r"directory .*open is writable by group or others"):
        read_policy_file(p)
    (tmp_path / "open").chmod(0o1777)  # sticky, as /tmp: only the owner may rename "etc"
    assert read_policy_file(p)[0].tunnel.interfaces == ("wg0",)
    os.chown(tmp_path / "open", 65534, 65534)
    with pytest.raises(PolicyError, match="owned by uid 65534"):
        read_policy_file(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need files owned by root")
def test_a_kernel_source_anyone_can_write_is_refused(tmp_path: Path) -> None:
    from ksbpf.policy_file import read_policy_file

    tree = tmp_path / "headers"
    (tree / "include" / "linux").mkdir(parents=True)
    header = _write(tree / "include" / "linux" / "types.h", "/* */\n")
    p = _write(tmp_path / "policy.toml", BASE + f'[bpf]\nkernel_source = "{tree}"\n')
    assert read_policy_file(p)[0].bpf.kernel_source == str(tree)
    header.chmod(0o666)
    with pytest.raises(PolicyError, match=r"bpf\.kernel_source.*types\.h"):
        read_policy_file(p)
    header.chmod(0o644)
    os.chown(tree / "include", 1000, 1000)
    with pytest.raises(PolicyError, match="uid 1000"):
        read_policy_file(p)
    # A tree that is not there is no trust question: the BPF layer reports missing headers.
    p2 = _write(tmp_path / "p2.toml", BASE + '[bpf]\nkernel_source = "/nonexistent/kernel-headers"\n')
    assert read_policy_file(p2)[0].bpf.kernel_source == "/nonexistent/kernel-headers"


def test_deeply_nested_toml_is_bad_input() -> None:
    with pytest.raises(PolicyError, match="nested too deeply"):
        loads_policy("a = " + "[" * 100_000)
