"""`ksctl audit` in the WireGuard lab: it passes with the kill switch engaged, fails naming
what leaked without it, warns when the tunnel path is broken, and leaves nothing behind.
The lab's far-side counter is the independent witness."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ksbpf.lab.addresses import ENDPOINT_PORT, SERVER_V4, SERVER_V6
from ksbpf.lab.lab import Lab
from ksbpf.linux.cgroup import cgroup2_mount
from tests.kernel.test_daemon_lab import lab_for_test
from tests.kernel.uplink import ksctl

pytestmark = pytest.mark.kernel

KINDS = {"tcp", "udp", "icmp", "dns", "dns-tcp", "raw"}


class Audit:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.state = str(tmp / "state")
        self.policy = tmp / "policy.toml"
        self.policy.write_text(lab.policy_toml())

    def ksctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ksctl(*args, netns=self.lab.client, state_dir=self.state)

    def up(self, *extra: str) -> None:
        r = self.ksctl("up", "--config", str(self.policy), *extra)
        assert r.returncode in (0, 3), r.stdout + r.stderr
        assert "nftables  engaged" in r.stdout and "routing   engaged" in r.stdout

    def run(self, *extra: str) -> tuple[int, dict[str, Any]]:
        r = self.ksctl("audit", "--config", str(self.policy), "--json", *extra)
        assert r.stdout.strip(), r.stderr
        return r.returncode, dict(json.loads(r.stdout))

    def run_text(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.ksctl("audit", "--config", str(self.policy), *extra)

    def audit_cgroups(self) -> list[Path]:
        return [p for p in cgroup2_mount().rglob("ksbpf-audit-*") if p.is_dir()]


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[Audit]:
    with lab_for_test() as lab:
        a = Audit(lab, tmp_path)
        try:
            yield a
        finally:
            a.ksctl("down")


def _kinds(report: dict[str, Any], family: int) -> set[str]:
    return {p["kind"] for p in report["probes"] if p["family"] == family and p["iface"] == "uplink"}


def test_audit_passes_with_the_kill_switch_engaged(audit: Audit) -> None:
    audit.up()
    audit.lab.reset_counters()
    rc, report = audit.run()
    assert rc == 0, json.dumps(report, indent=1)
    assert report["verdict"] == "PASS" and report["leaked"] == [] and report["unproven"] == []
    assert _kinds(report, 4) == KINDS and _kinds(report, 6) == KINDS
    targets = report["interfaces"][0]["targets"]
    assert "gateway" in targets[SERVER_V4] and "endpoint" in targets[SERVER_V4] and "gateway" in targets[SERVER_V6]
    # Each stop is proven: refused by the kernel or counted by a drop counter.
    for p in report["probes"]:
        assert p["outcome"] == "stopped", p
        assert p["how"].startswith("refused by the kernel") or p["counted"], p
    endpoint = [p for p in report["probes"] if p["port"] == ENDPOINT_PORT]
    assert endpoint and all(p["expect"] == "endpoint_unauthorized" for p in endpoint)
    assert any("endpoint_unauthorized" in k for p in endpoint for k in p["counted"])
    assert [t["ok"] for t in report["tunnel"]] == [True] and report["tunnel"][0]["via"] == audit.lab.wg
    assert report["cgroup_removed"] and audit.audit_cgroups() == []
    assert audit.lab.leaks() == 0, audit.lab.leak_details()

    r = audit.run_text()
    assert r.returncode == 0 and "PASS: all" in r.stdout and "LEAKED" not in r.stdout
    assert "tunnel path: DNS to 10.64.0.1 answered" in r.stdout


def test_audit_passes_with_nftables_and_routing_alone(audit: Audit) -> None:
    audit.up("--no-bpf")
    rc, report = audit.run()
    assert rc == 0, report["leaked"] + report["unproven"]
    assert report["layers"]["bpf"]["engaged"] is False
    assert audit.lab.leaks() == 0


def test_audit_fails_naming_what_leaked_without_the_kill_switch(audit: Audit) -> None:
    audit.lab.reset_counters()
    rc, report = audit.run()
    assert rc == 1 and report["verdict"] == "FAIL"
    leaked = "\n".join(report["leaked"])
    for name in (f"tcp {SERVER_V4}:443 out of uplink", f"udp {SERVER_V4}:443 out of uplink", f"icmp {SERVER_V4} out of uplink",
                 f"dns/udp {SERVER_V4}:53 out of uplink", f"tcp [{SERVER_V6}]:443 out of uplink",
                 f"icmp {SERVER_V6} out of uplink", f"dns/udp [{SERVER_V6}]:53 out of uplink"):
        assert name in leaked, leaked
    # Raw frames get no answer and nothing counts them: not proven stopped.
    assert any(u.startswith("raw frame") for u in report["unproven"])
    assert audit.lab.leaks() > 0, "the far side saw them too"
    assert audit.audit_cgroups() == []

    r = audit.run_text()
    assert r.returncode == 1
    assert "FAIL:" in r.stdout and f"LEAKED   tcp {SERVER_V4}:443 out of uplink (TCP handshake completed)" in r.stdout


def test_audit_warns_when_the_tunnel_path_is_broken(audit: Audit) -> None:
    audit.up()
    audit.lab.tunnel_down()
    audit.lab.reset_counters()
    rc, report = audit.run("--timeout", "0.5")
    assert rc == 3 and report["verdict"] == "WARN", report["tunnel"]
    assert report["leaked"] == [] and report["unproven"] == []
    assert report["tunnel"][0]["ok"] is False
    assert audit.lab.leaks() == 0


def test_audit_refuses_bad_input(audit: Audit) -> None:
    r = audit.ksctl("audit", "--config", str(audit.policy), "--target", "not-an-address")
    assert r.returncode == 2 and "--target" in r.stderr
    bad = audit.policy.with_name("bad.toml")
    bad.write_text("[tunnel\n")
    r = audit.ksctl("audit", "--config", str(bad))
    assert r.returncode == 2 and "TOML" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ksbpf.audit"], capture_output=True, text=True)
    assert r.returncode == 2
    assert audit.audit_cgroups() == []
