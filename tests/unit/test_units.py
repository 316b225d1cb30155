"""The systemd units and the boot lockdown ruleset.

`systemd-analyze verify` checks that every ExecStart= binary exists. The units name
their installed paths (/usr/bin/ksbpfd, /usr/share/ksbpf/lockdown.nft), which a
development checkout does not have: the units are verified as shipped (the only finding
allowed is a missing /usr/bin/ksbpfd, and only when it is indeed missing), and again with
those paths pointed at this checkout, where nothing at all may be reported.
"""

from __future__ import annotations

import configparser
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"
DAEMON, LOCKDOWN = UNITS / "ksbpf.service", UNITS / "ksbpf-lockdown.service"
LOCKDOWN_NFT = REPO / "nft" / "lockdown.nft"
INSTALLED_KSBPFD = "/usr/bin/ksbpfd"
INSTALLED_LOCKDOWN = "/usr/share/ksbpf/lockdown.nft"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)], capture_output=True, text=True, timeout=60)


def local_ksbpfd() -> str:
    exe = shutil.which("ksbpfd") or str(Path(sys.executable).with_name("ksbpfd"))
    if not os.access(exe, os.X_OK):
        pytest.skip("no ksbpfd entry point installed (pip install -e .)")
    return exe


@needs_analyze
def test_units_verify_with_this_checkouts_paths(tmp_path: Path) -> None:
    (tmp_path / DAEMON.name).write_text(DAEMON.read_text().replace(INSTALLED_KSBPFD, local_ksbpfd()))
    (tmp_path / LOCKDOWN.name).write_text(LOCKDOWN.read_text().replace(INSTALLED_LOCKDOWN, str(LOCKDOWN_NFT)))
    r = verify(tmp_path / DAEMON.name, tmp_path / LOCKDOWN.name)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


@needs_analyze
def test_units_verify_as_shipped() -> None:
    r = verify(DAEMON, LOCKDOWN)
    findings = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    if os.access(INSTALLED_KSBPFD, os.X_OK):
        assert r.returncode == 0 and not findings, findings
    else:
        assert findings == [f"ksbpf.service: Command {INSTALLED_KSBPFD} is not executable: No such file or directory"]


def test_daemon_unit_contract() -> None:
    s = unit(DAEMON)["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"].split()[0] == INSTALLED_KSBPFD and "--config /etc/ksbpf/policy.toml" in s["ExecStart"]
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["Restart"] == "always" and int(s["WatchdogSec"]) > 0
    assert s["RestartPreventExitStatus"] == "2"  # ksbpfd's exit code for a refused policy
    caps = set(s["CapabilityBoundingSet"].split())
    assert caps <= {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"}
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert set(s["ReadWritePaths"].split()) == {"/var/lib/ksbpf", "/run/ksbpf", "/sys/fs/bpf"}
    assert s["StateDirectory"] == "ksbpf" and s["RuntimeDirectory"] == "ksbpf"
    assert "AF_PACKET" not in s["RestrictAddressFamilies"]
    u = unit(DAEMON)["Unit"]
    assert "ksbpf-lockdown.service" in u["Wants"] and "ksbpf-lockdown.service" in u["After"]


def test_lockdown_unit_contract() -> None:
    cp = unit(LOCKDOWN)
    u, s = cp["Unit"], cp["Service"]
    assert u["DefaultDependencies"] == "no"
    assert "network-pre.target" in u["Before"].split() and "network-pre.target" in u["Wants"].split()
    assert s["Type"] == "oneshot" and s["RemainAfterExit"] == "yes"
    assert s["ExecStart"] == f"/usr/sbin/nft -f {INSTALLED_LOCKDOWN}"
    assert "ExecStop" not in s, "stopping the lockdown must not open the machine"
    assert s["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert cp["Install"]["WantedBy"] == "sysinit.target"


def test_lockdown_ruleset_blocks_all_but_loopback_and_ships_as_package_data() -> None:
    text = LOCKDOWN_NFT.read_text()
    assert (importlib.resources.files("ksbpf.nft") / "lockdown.nft").read_text() == text
    rules = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    chains = re.findall(r"type filter hook (\w+) priority [^;]+; policy (\w+);", text)
    assert sorted(chains) == [("forward", "drop"), ("input", "drop"), ("output", "drop")]
    accepts = [r for r in rules if r.endswith("accept")]
    assert accepts == ['iif "lo" accept', 'oif "lo" accept']
    # The table ksbpfd deletes once it enforces (ksbpf.daemon.LOCKDOWN_TABLE).
    from ksbpf.daemon import LOCKDOWN_TABLE

    assert f"table inet {LOCKDOWN_TABLE} {{" in text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root")
def test_lockdown_ruleset_parses() -> None:
    r = subprocess.run(["nft", "-c", "-f", str(LOCKDOWN_NFT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@needs_analyze
def test_security_exposure_is_reported(tmp_path: Path) -> None:
    """`systemd-analyze security` scores the sandbox (0 best, 10 worst). A root daemon with
    CAP_SYS_ADMIN for BCC cannot be perfect; the score must not get worse unnoticed."""
    (tmp_path / DAEMON.name).write_text(DAEMON.read_text().replace(INSTALLED_KSBPFD, local_ksbpfd()))
    (tmp_path / LOCKDOWN.name).write_text(LOCKDOWN.read_text().replace(INSTALLED_LOCKDOWN, str(LOCKDOWN_NFT)))
    scores = {}
    for name in (DAEMON.name, LOCKDOWN.name):
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
        if m is None:
            pytest.skip(f"this systemd-analyze cannot score offline: {(r.stderr or r.stdout).strip()[-200:]}")
        scores[name] = float(m.group(1))
    print(f"systemd-analyze security: {scores}")
    assert scores[DAEMON.name] <= 5.0 and scores[LOCKDOWN.name] <= 4.0, scores
