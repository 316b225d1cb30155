"""The shipped Prometheus rules and Grafana dashboard (monitoring/): promtool checks the
rules and runs their unit tests; every dashboard query parses as PromQL; rules and
dashboard name only metrics, and labels, that ksbpfd's collector exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ksbpf.metrics import DropSample, Histogram, KsbpfCollector, Snapshot

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "ksbpf-rules.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "ksbpf-rules.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "ksbpf.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is missing: `make setup` installs it (Debian package prometheus)"
)

# Labels Prometheus adds to every scraped series, and the series it makes itself.
TARGET_LABELS = {"job", "instance"}
SYNTHETIC = {"up": TARGET_LABELS}
# Grafana's variables, as Grafana would fill them in, so that promtool can parse the query.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$job": ".*", "$instance": ".*"}
NAME_RE = re.compile(r"\bksbpf_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Sample name -> its label names, as a scrape of the collector shows them, fed a
    snapshot in which every family has series."""
    drops = [DropSample("nftables", "dns", "ipv4", "", 3, 180), DropSample("bpf", "no_tunnel", "", "system.slice", 1, 60)]
    hist = Histogram()
    hist.observe(0.2)
    snap = Snapshot(layers={"nftables": True, "routing": True, "bpf": True}, tunnels={"wg0": True}, exemptions=1,
                    drift_repairs={"nftables": 1}, reloads={"ok": 1}, config_applied_at=1.0)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(KsbpfCollector(lambda: snap, [lambda: drops], hist))  # type: ignore[arg-type]
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def rule_exprs() -> dict[str, str]:
    """alert name -> expression (each on one line in the file, as written)."""
    text = RULES.read_text()
    alerts = re.findall(r"^\s*- alert: (\w+)\n(?:\s*#.*\n)*\s*expr: (.+)$", text, re.M)
    assert len(alerts) == text.count("- alert:") and alerts, "every alert's expr on one line after its name"
    for name, expr in alerts:
        assert not expr.startswith(("|", ">")), f"{name}: keep the expression on one line"
    return dict(alerts)


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def dashboard_exprs() -> list[str]:
    d = dashboard()
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+), *(\w+)\)", q)
            assert m, f"variable {var['name']}: {q}"
            exprs.append(m.group(1))
    return exprs


def as_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in r.stdout


@needs_promtool
def test_rules_unit_tests_pass() -> None:
    r = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_tested_to_fire_and_to_clear() -> None:
    """Structure of the promtool tests: each alert is expected absent before it fires
    (pending), firing, and absent again after (cleared); promtool checks each expectation."""
    text = RULE_TESTS.read_text()
    firing = [(a, int(t)) for t, a in re.findall(r"- eval_time: (\d+)m\n\s+alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", text)]
    quiet = [(a, int(t)) for t, a in re.findall(r"\{eval_time: (\d+)m, alertname: (\w+), exp_alerts: \[\]\}", text)]
    assert text.count("alertname:") == len(firing) + len(quiet), "an expectation this test cannot read"
    for alert in rule_exprs():
        fires = [t for a, t in firing if a == alert]
        assert fires, f"{alert} is never expected to fire"
        before = [t for a, t in quiet if a == alert and t < min(fires)]
        after = [t for a, t in quiet if a == alert and t > max(fires)]
        assert before and after, f"{alert}: expect it quiet before it fires and after it clears"


def test_rules_and_dashboard_use_only_exported_metrics_and_labels() -> None:
    names = {**exported(), **SYNTHETIC}
    exprs = {**{f"alert {a}": e for a, e in rule_exprs().items()},
             **{f"dashboard query {i}": e for i, e in enumerate(dashboard_exprs())}}
    for where, expr in exprs.items():
        used = set(NAME_RE.findall(expr))
        unknown = used - names.keys()
        assert not unknown, f"{where}: {sorted(unknown)} not exported (exported: {sorted(names)})"
        labels = set(TARGET_LABELS) | {"le"}
        for name in used:
            labels |= names[name]
        for metric, matchers in SELECTOR_RE.findall(expr):
            if metric in names:
                bad = set(MATCHER_RE.findall(matchers)) - names[metric] - TARGET_LABELS
                assert not bad, f"{where}: {metric} has no label {sorted(bad)}"
        for group in GROUPING_RE.findall(expr):
            bad = {g.strip() for g in group.split(",") if g.strip()} - labels
            assert not bad, f"{where}: grouping by {sorted(bad)}, which no metric in it has"


def test_the_checks_above_can_fail() -> None:
    """The name and label checks read what they should: a typo'd name or label is caught."""
    names = exported()
    assert "ksbpf_dropped_packets_total" in names and "ksbpf_dropped_packets" not in names
    assert names["ksbpf_dropped_packets_total"] == {"layer", "reason", "family", "cgroup"}
    assert NAME_RE.findall('rate(ksbpf_droped_packets_total{reason="dns"}[5m])') == ["ksbpf_droped_packets_total"]
    assert SELECTOR_RE.findall('x{layer="bpf",cgroups!~"a"}') == [("x", 'layer="bpf",cgroups!~"a"')]
    assert MATCHER_RE.findall('layer="bpf",cgroups!~"a"') == ["layer", "cgroups"]
    assert GROUPING_RE.findall("sum by (layer, reason) (x) / on (instance) y") == ["layer, reason", "instance"]


def test_dashboard_is_json_with_the_fleet_panels() -> None:
    d = dashboard()
    ps = [p for p in panels(d) if p["type"] != "row"]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    for p in ps:
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    text = "\n".join(dashboard_exprs())
    for needed in ("ksbpf_dropped_packets_total", "ksbpf_layer_engaged", "ksbpf_tunnel_up", "ksbpf_drift_repairs_total",
                   "ksbpf_policy_reloads_total", "ksbpf_config_last_reload_successful",
                   "ksbpf_config_last_reload_success_timestamp_seconds", "ksbpf_policy_apply_seconds_bucket",
                   "ksbpf_scrape_errors_total"):
        assert needed in text, f"the dashboard does not show {needed}"
    assert "by (layer, reason)" in text and "by (cgroup, reason)" in text
    assert "histogram_quantile(" in text
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables


@needs_promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses a bare expression only inside a rule: each query becomes a recording
    rule of a rules file (JSON is YAML) that `promtool check rules` must accept."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"ksbpf_dashboard_query_{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules, indent=1))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout
    # And a broken one is refused, so the check above means something.
    path.write_text(json.dumps({"groups": [{"name": "x", "rules": [{"record": "x", "expr": "sum by (a (x)"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0
