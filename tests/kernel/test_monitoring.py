"""monitoring/ against the real thing: a Prometheus server (Debian's, on loopback) scrapes a
ksbpfd that enforces in a test namespace, loads the shipped alert rules, and answers every
query of the shipped dashboard; taking the kill switch down, or a refused policy file,
makes the matching alert pending."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import test_daemon
from tests.kernel.test_daemon import DaemonFactory, World, bpf_engaged, free_port, send, wait_for
from tests.unit.test_monitoring import RULES, as_promql, dashboard_exprs, rule_exprs

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is missing: `make setup` installs it")
# The daemon tests' fixtures: a client namespace behind a counting uplink, and ksbpfd in it.
world = test_daemon.world
daemon = test_daemon.daemon


class Prometheus:
    def __init__(self, tmp: Path, target_port: int) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        # JSON is YAML. Only the daemon's loopback endpoint is scraped.
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "ksbpf", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        self.log = tmp / "prometheus.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=f, stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alerts(self) -> dict[str, str]:
        """alertname -> state (pending, firing) of the active alerts."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # by its pid
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus(world: World, tmp_path: Path) -> Iterator[Prometheus]:
    p = Prometheus(tmp_path, world.port)
    try:
        wait_for(p.ready, "prometheus to be ready", timeout=60, interval=0.2)
        yield p
    finally:
        p.stop()


def test_rules_and_dashboard_work_on_a_real_scrape(world: World, daemon: DaemonFactory, prometheus: Prometheus) -> None:
    vpn = world.cgroups("bpf/vpn-client")
    d = daemon(world.policy().replace(
        "endpoint_mark = 0xca6c", f'endpoint_mark = 0xca6c\nendpoint_cgroups = ["{world.cgroups.rel(vpn)}"]'))
    bpf = bpf_engaged(d.scrape())
    wait_for(lambda: prometheus.query('count_over_time(up{job="ksbpf"}[1m]) >= 2 and up{job="ksbpf"} == 1'),
             "prometheus to scrape ksbpfd", timeout=60, interval=0.5)
    # Drops for the panels to show, after scrapes saw the counters before them: around the
    # tunnel (nftables), and marked to the endpoint from a cgroup that is not the VPN
    # client's (bpf).
    assert send(world.client, world.apps, "192.0.2.1", 9, 5, dev=world.uplink.up_if)["errors"] == {"EPERM": 5}
    if bpf:
        assert send(world.client, world.apps, "192.0.2.1", 51820, 5, mark=0xCA6C)["errors"] == {"EPERM": 5}
    wait_for(lambda: prometheus.query('sum(rate(ksbpf_dropped_packets_total[1m])) > 0'),
             "the drops to show in a rate", timeout=30, interval=0.5)
    if bpf:  # a cgroup id new to ksbpfd is named at its next walk of the tree (within 5 s); rate needs 2 samples
        wait_for(lambda: prometheus.query('count_over_time(ksbpf_dropped_packets_total{layer="bpf"}[1m]) >= 2'),
                 "the bpf series", timeout=30, interval=0.5)

    empty = []
    for expr in dashboard_exprs():
        q = as_promql(expr.replace("$__rate_interval", "1m").replace("$__range", "5m"))
        if not prometheus.query(q):
            empty.append(q)
    allowed = [] if bpf else [q for q in empty if 'layer="bpf"' in q]
    assert empty == allowed, f"dashboard queries with no series on a real scrape: {empty}"

    # Every rule loaded and evaluates without error against the real series.
    groups = prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert rules.keys() == rule_exprs().keys()
    wait_for(lambda: all(r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2")
                         for g in prometheus.api("rules")["groups"] for r in g["rules"]),
             "every rule to evaluate", timeout=30, interval=0.5)
    assert prometheus.alerts() == {}, "nothing is wrong yet"

    # The kill switch taken down through the daemon: not enforcing (and not "a layer").
    r = world.ksctl("down")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: prometheus.alerts().get("KsbpfNotEnforcing") == "pending", "KsbpfNotEnforcing", timeout=30)
    assert "KsbpfLayerDisengaged" not in prometheus.alerts()

    # A policy file refused by a reload: the older policy enforces, and the alert says so.
    world.write_policy(world.policy("surprise = 1\n"))
    d.signal(signal.SIGHUP)
    wait_for(lambda: prometheus.alerts().get("KsbpfReloadFailing") == "pending", "KsbpfReloadFailing", timeout=30)
