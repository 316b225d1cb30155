"""The generated boot lockdown: pure rendering, and the atomic write of <state>/lockdown.nft.
Real nft checks the text in tests/kernel/test_lockdown.py."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ksbpf.lockdown_file import lockdown_path, write_lockdown, write_lockdown_logged
from ksbpf.policy import Exemption, PortSpec, loads_policy
from ksbpf.render.lockdown import render_lockdown

REPO = Path(__file__).resolve().parents[2]
BASE = """
[tunnel]
interfaces = ["wg0"]
endpoints = ["198.51.100.7:51820/udp"]
endpoint_mark = 0xca6c
"""
ADMIN = BASE + """
[[exempt]]
cgroup = "system.slice/ssh.service"
listen = ["tcp/22", "udp/60000-61000"]
from = ["10.0.0.0/8", "192.168.1.0/24"]
[[exempt]]
cgroup = "system.slice/web.service"
listen = ["tcp/443"]
[[exempt]]
cgroup = "system.slice/systemd-timesyncd.service"
allow = ["udp/123"]
to = ["162.159.200.1/32"]
"""


def rules(text: str) -> list[str]:
    """The ruleset without comments, blank lines and indentation."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_without_listen_exemptions_it_is_the_static_lockdown() -> None:
    static = rules((REPO / "nft" / "lockdown.nft").read_text())
    assert rules(render_lockdown(None)) == static
    assert rules(render_lockdown(loads_policy(BASE))) == static
    allow_only = loads_policy(BASE + '[[exempt]]\ncgroup = "a.service"\nallow = ["udp/123"]\n')
    assert rules(render_lockdown(allow_only)) == static


def test_listen_exemptions_open_their_ports_from_their_networks_and_let_replies_out() -> None:
    text = render_lockdown(loads_policy(ADMIN, "/etc/ksbpf/policy.toml"))
    got = rules(text)
    inp = got[got.index("chain input {"):got.index("chain forward {")]
    out = got[got.index("chain output {"):]
    assert "ip saddr { 10.0.0.0/8, 192.168.1.0/24 } tcp dport { 22 } ct state { new, established } accept" in inp
    assert "ip saddr { 10.0.0.0/8, 192.168.1.0/24 } udp dport { 60000-61000 } ct state { new, established } accept" in inp
    assert "ip daddr { 10.0.0.0/8, 192.168.1.0/24 } tcp sport { 22 } ct state { established, related } accept" in out
    # no IPv6 source given: no IPv6 rule for ssh; web.service (any source) both families
    assert not any("ip6" in r and "dport { 22 }" in r for r in inp)
    assert "meta nfproto ipv4 tcp dport { 443 } ct state { new, established } accept" in inp
    assert "meta nfproto ipv6 tcp dport { 443 } ct state { new, established } accept" in inp
    assert "meta nfproto ipv6 tcp sport { 443 } ct state { established, related } accept" in out
    # an outbound (allow) exemption opens nothing before the daemon: no cgroup identity yet
    assert not any("123" in r for r in got)
    # the static skeleton is all there, policies drop
    for line in ("table inet ksbpf_lockdown", "delete table inet ksbpf_lockdown", 'iif "lo" accept', 'oif "lo" accept'):
        assert line in got
    assert sum("policy drop;" in r for r in got) == 3
    # nothing new goes out: every output accept but loopback and ND is for established traffic
    for r in out:
        if r.endswith("accept") and "lo" not in r and "icmpv6 type" not in r:
            assert "ct state { established, related }" in r, r
    assert "/etc/ksbpf/policy.toml" in text and "system.slice/ssh.service" in text


def test_neighbour_discovery_only_when_an_ipv6_source_may_reach_an_exemption() -> None:
    v4_only = loads_policy(BASE + '[[exempt]]\ncgroup = "s.service"\nlisten = ["tcp/22"]\nfrom = ["10.0.0.0/8"]\n')
    assert "icmpv6 type" not in render_lockdown(v4_only)
    v6 = loads_policy(BASE + '[[exempt]]\ncgroup = "s.service"\nlisten = ["tcp/22"]\nfrom = ["2001:db8::/32"]\n')
    got = rules(render_lockdown(v6))
    assert "ip6 saddr { 2001:db8::/32 } tcp dport { 22 } ct state { new, established } accept" in got
    assert not any(r.startswith("ip saddr") for r in got)
    assert sum(r.startswith("icmpv6 type {") for r in got) == 2  # in and out


def test_the_renderer_refuses_what_validation_would_have_refused() -> None:
    policy = loads_policy(BASE)
    bad_cgroup = replace(policy, exemptions=(Exemption("a.service\nflush ruleset", listen=(PortSpec("tcp", 22, 22),)),))
    with pytest.raises(ValueError, match="refusing"):
        render_lockdown(bad_cgroup)
    bad_port = replace(policy, exemptions=(Exemption("a.service", listen=(PortSpec("tcp", 0, 22),)),))
    with pytest.raises(ValueError, match="refusing"):
        render_lockdown(bad_port)
    # the only free text, the policy's path, cannot break out of its comment line
    odd = replace(loads_policy(ADMIN), source="/tmp/x\nflush ruleset\n")
    assert "flush ruleset" not in rules(render_lockdown(odd))


def test_write_is_atomic_0600_and_rewrites_only_on_change(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = write_lockdown(loads_policy(ADMIN), state)
    assert path == lockdown_path(state) == state / "lockdown.nft"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == render_lockdown(loads_policy(ADMIN))
    assert [p.name for p in state.iterdir()] == ["lockdown.nft"]  # no temporary file left
    inode = path.stat().st_ino
    write_lockdown(loads_policy(ADMIN), state)
    assert path.stat().st_ino == inode  # same text: not replaced
    write_lockdown(loads_policy(BASE), state)
    assert path.stat().st_ino != inode and "dport" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_is_logged_and_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with caplog.at_level(logging.INFO, logger="ksbpf.lockdown"):
        assert write_lockdown_logged(loads_policy(ADMIN), not_a_dir) is None
        assert "not written" in caplog.text
        caplog.clear()
        assert write_lockdown_logged(loads_policy(ADMIN), tmp_path / "ok") == tmp_path / "ok" / "lockdown.nft"
        assert "1 inbound admin exemption(s)" not in caplog.text and "2 inbound admin exemption(s) open" in caplog.text
    bad = replace(loads_policy(BASE), exemptions=(Exemption("x\ny", listen=(PortSpec("tcp", 22, 22),)),))
    assert write_lockdown_logged(bad, tmp_path / "bad") is None


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    write_lockdown(loads_policy(ADMIN), tmp_path)
    before = (tmp_path / "lockdown.nft").read_text()
    (tmp_path / f".lockdown.nft.{os.getpid()}.tmp").mkdir()  # the temporary file cannot be made
    with pytest.raises(OSError):
        write_lockdown(loads_policy(BASE), tmp_path)
    assert (tmp_path / "lockdown.nft").read_text() == before


def test_renderer_and_wgconf_are_pure() -> None:
    code = (
        "import sys\n"
        "import ksbpf.render.lockdown, ksbpf.wgconf, ksbpf.lockdown_file\n"
        "print(','.join(m for m in ('nftables', 'pyroute2', 'bcc') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
