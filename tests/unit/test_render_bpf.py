"""The BPF plan as `ksctl render` shows it: keys decoded back to text, no kernel asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ksbpf.cli import main
from ksbpf.policy import loads_policy
from ksbpf.render import bpf

POLICY = """
[tunnel]
interfaces = ["wg0", "tun*"]
endpoints = ["198.51.100.7:51820/udp", "[2001:db8::7]:443/tcp"]
endpoint_mark = 0xca6c
endpoint_cgroups = ["system.slice/wg.service"]

[dns]
servers = ["10.64.0.1", "fd00::53"]

[lan]
allow = true
networks = ["192.168.1.0/24"]

[ipv6]
mode = "block"

[[exempt]]
cgroup = "system.slice/ssh.service"
listen = ["tcp/22"]
from = ["10.0.0.0/8"]

[[exempt]]
cgroup = "system.slice/backup.service"
allow = ["tcp/1000-1003"]
to = ["203.0.113.0/24"]
"""


def test_the_plan_reads_back_as_the_policy_wrote_it() -> None:
    plan = bpf.render(loads_policy(POLICY))
    d = bpf.to_dict(plan)
    assert d["flags"] == ["ipv6 block", "endpoint mark", "endpoint cgroups"]
    assert d["endpoint_mark"] == "0xca6c" and d["tunnel_interfaces"] == ["wg0", "tun*"]
    assert d["endpoints"] == ["udp 198.51.100.7:51820", "tcp [2001:db8::7]:443"]
    assert d["dns"] == ["10.64.0.1", "fd00::53"]
    assert d["lan"] == ["192.168.1.0/24"]
    assert d["endpoint_cgroups"] == ["system.slice/wg.service"]
    exemptions = d["exemptions"]
    assert isinstance(exemptions, list)
    ssh, backup = exemptions
    assert ssh["cgroup"] == "system.slice/ssh.service" and ssh["listen"] == ["tcp/22"]
    assert ssh["from"] == ["10.0.0.0/8"] and ssh["allow"] == [] and ssh["keys"] == {"ports": 1, "nets": 1}
    # A port range is as many LPM keys as aligned blocks: 1000-1003 is one /14 block.
    assert backup["allow"] == ["tcp/1000-1003"] and backup["to"] == ["203.0.113.0/24"]
    assert backup["keys"] == {"ports": len(bpf.port_prefixes(1000, 1003)), "nets": 1}
    # The counts are the ones check_capacity holds against the limits.
    assert d["keys"] == {"cgroups": 3, "ports": 2, "nets": 3}
    assert d["keys"] == dict(zip(("cgroups", "ports", "nets"), bpf.key_counts(plan), strict=True))
    assert json.loads(bpf.to_json(plan)) == d


def test_describe_names_each_part_once() -> None:
    lines = bpf.describe(bpf.render(loads_policy(POLICY)))
    assert lines[0] == "flags: ipv6 block, endpoint mark, endpoint cgroups"
    assert "endpoint tcp [2001:db8::7]:443" in lines and "dns fd00::53" in lines and "lan 192.168.1.0/24" in lines
    exempt = [ln for ln in lines if ln.startswith("exempt ")]
    assert len(exempt) == 2 and exempt[1].endswith("allow tcp/1000-1003 to 203.0.113.0/24")
    assert lines[-1] == "keys: 3 cgroups, 2 port rules, 3 network rules"


def test_ksctl_render_shows_the_bpf_plan_after_the_routing_plan(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "policy.toml"
    cfg.write_text(POLICY)
    assert main(["render", "--platform", "linux", "--offline", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    nft, _, rest = out.partition("\n# policy routing")
    json.loads(nft)  # the nftables plan still comes first, whole
    routing, _, maps = rest.partition("\n# cgroup-bpf maps\n")
    assert routing and maps
    want = bpf.describe(bpf.render(loads_policy(POLICY)))
    assert maps.splitlines() == [f"# {line}" for line in want]
