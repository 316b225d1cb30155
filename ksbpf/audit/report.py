"""The audit's verdict (PASS, WARN, FAIL and the exit code) and its text report."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ksbpf.audit.plan import Probe

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_WARN, EXIT_ERROR = 0, 1, 2, 3, 4


def judge(report: dict[str, Any]) -> dict[str, Any]:
    """The verdict and exit code of a report whose probes have their outcomes."""
    probes = report["probes"]
    leaked = [p for p in probes if p["outcome"] == "leaked"]
    unproven = [p for p in probes if p["outcome"] == "unproven"]
    stopped = [p for p in probes if p["outcome"] == "stopped"]
    tunnel = report["tunnel"]
    tunnel_ok = bool(tunnel) and all(t.get("ok") for t in tunnel)
    if leaked or unproven:
        verdict, code = "FAIL", EXIT_FAIL
    elif not stopped or (tunnel and not tunnel_ok):
        verdict, code = "WARN", EXIT_WARN
    else:
        verdict, code = "PASS", EXIT_PASS
    report.update(verdict=verdict, exit=code, leaked=[_name(p) for p in leaked], unproven=[_name(p) for p in unproven],
                  summary={"probes": len(probes), "stopped": len(stopped), "leaked": len(leaked), "unproven": len(unproven),
                           "skipped": sum(p["outcome"] == "skipped" for p in probes), "allowed": len(report["allowed"])})
    return report


def _name(p: dict[str, Any]) -> str:
    return f"{Probe.from_dict(p).describe()} out of {p['iface']} ({p['how']})"


def _counted(p: dict[str, Any]) -> str:
    c = p.get("counted") or {}
    if not c:
        return ""
    parts = [f"{k.replace(':', ' ')} +{v}" for k, v in sorted(c.items())]
    note = "" if any(k.split(":", 1)[1].startswith(p["expect"]) for k in c) else f" (policy says {p['expect']})"
    return "; counted " + ", ".join(parts) + note


def render(report: dict[str, Any], out: TextIO = sys.stdout) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

    say(f"ksbpf audit{' [netns ' + report['netns'] + ']' if report['netns'] else ''}: policy {report['policy']}")
    say("  layers: " + ", ".join(f"{n} {'engaged' if s['engaged'] else 'NOT ENGAGED'}" for n, s in report["layers"].items()))
    say(f"  probes sent from cgroup {report['cgroup']} ({'removed' if report['cgroup_removed'] else 'NOT REMOVED'} afterwards)")
    mark = {"stopped": "stopped ", "leaked": "LEAKED  ", "unproven": "UNPROVEN", "skipped": "skipped "}
    for iface in report["interfaces"]:
        say()
        extra = f", {iface['neighbours_not_probed']} more neighbours not probed" if iface["neighbours_not_probed"] else ""
        say(f"  {iface['name']} (ifindex {iface['index']}, {'up' if iface['up'] else 'down'}): "
            f"{len(iface['targets'])} targets{extra}")
        for addr, whys in iface["targets"].items():
            say(f"    target {addr} ({', '.join(whys)})")
        for p in report["probes"]:
            if p["iface"] == iface["name"]:
                what = Probe.from_dict(p).describe()
                note = " [the endpoint's flow, without its mark]" if p["why"].startswith("endpoint's own port") else ""
                say(f"    {mark.get(p['outcome'], p['outcome'])} {what:<32} {p['how']}{_counted(p)}{note}")
        for a in report["allowed"]:
            if a["iface"] == iface["name"]:
                say(f"    allowed  {Probe.from_dict(a).describe():<32} the policy allows it ({a['reason']})")
    if not report["interfaces"]:
        say("  no interface other than loopback and the tunnel: nothing to probe")
    say()
    for t in report["tunnel"]:
        if t.get("ok"):
            say(f"  tunnel path: DNS to {t['server']} answered in {t['ms']} ms via {t.get('via', '?')}")
        else:
            say(f"  tunnel path: DNS to {t['server']}: {t['detail']}")
    if not report["tunnel"]:
        say("  tunnel path: not checked (the policy names no resolver)")
    s = report["summary"]
    say()
    if report["verdict"] == "FAIL":
        say(f"FAIL: {s['leaked']} probe(s) LEAKED and {s['unproven']} UNPROVEN of {s['probes']}:")
        for line in report["leaked"]:
            say(f"  LEAKED   {line}")
        for line in report["unproven"]:
            say(f"  UNPROVEN {line}")
    elif report["verdict"] == "WARN":
        why = "no probe could be sent" if not s["stopped"] else "the tunnel path does not work"
        say(f"WARN: nothing left outside the tunnel ({s['stopped']} of {s['probes']} probes stopped), but {why}")
    else:
        say(f"PASS: all {s['stopped']} probes over {len(report['interfaces'])} interface(s) were stopped, "
            f"each refused or counted; the tunnel path works")
    if s["skipped"] or s["allowed"]:
        say(f"  ({s['skipped']} could not be sent here, {s['allowed']} allowed by the policy and not sent)")
