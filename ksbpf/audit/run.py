"""`ksctl audit`: make the audit cgroup, plan the probes, run the worker in that cgroup,
remove it (also on failure), judge and report."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ksbpf.audit.discover import discover
from ksbpf.audit.plan import plan_probes
from ksbpf.audit.report import EXIT_ERROR, judge, render
from ksbpf.errors import KsbpfError
from ksbpf.policy import Policy, load_policy


def _audit_cgroup(policy: Policy) -> Path:
    from ksbpf.linux.cgroup import cgroup2_mount, cgroup_dir

    parent = cgroup_dir(policy.bpf.cgroup)
    if not parent.is_dir():
        parent = cgroup2_mount()
    d = parent / f"ksbpf-audit-{secrets.token_hex(3)}"
    d.mkdir()
    return d


def _remove_cgroup(d: Path) -> None:
    import signal

    for _ in range(100):
        try:
            pids = (d / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _route_oif(netns_name: str | None, server: str) -> str:
    from pyroute2 import IPRoute

    from ksbpf.linux.netns import netns

    try:
        with netns(netns_name), IPRoute() as ipr:
            route = ipr.route("get", dst=server)[0]
            idx = route.get_attr("RTA_OIF")
            link = ipr.get_links(idx)[0] if idx else None
            return str(link.get_attr("IFLA_IFNAME")) if link is not None else "?"
    except (OSError, KsbpfError, IndexError) as e:
        return f"? ({e})"


def _layers(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from ksbpf.linux.engine import LinuxEngine, state_dir_for

    state = state_dir_for(args.netns, Path(args.state_dir)) if getattr(args, "state_dir", None) else None
    try:
        return {n: s.as_dict() for n, s in LinuxEngine(netns=args.netns, state_dir=state).status().items()}
    except KsbpfError as e:
        return {"status": {"engaged": False, "detail": str(e)}}


def audit(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, probe (in a worker process in the audit cgroup), clean up, judge."""
    from ksbpf.linux.bpf.layout import instance_name
    from ksbpf.linux.netns import netns

    policy = load_policy(args.config)
    targets = []
    for t in getattr(args, "target", None) or []:
        try:
            targets.append(str(ipaddress.ip_address(t)))
        except ValueError:
            from ksbpf.errors import PolicyError

            raise PolicyError(f"{t!r} is not an IP address", source="ksctl audit", key="--target") from None
    timeout = float(getattr(args, "timeout", None) or 1.0)
    report: dict[str, Any] = {"netns": args.netns, "policy": str(args.config), "layers": _layers(args)}
    cg = _audit_cgroup(policy)
    try:
        from ksbpf.linux.cgroup import relative_path

        rel = relative_path(cg)
        report["cgroup"] = rel
        with netns(args.netns):
            interfaces = discover(policy, targets)
        probes, allowed = plan_probes(policy, interfaces, rel)
        job = {
            "netns": args.netns, "cgroup": str(cg), "cgroup_id": os.stat(cg).st_ino, "timeout": timeout,
            "bpf_instance": instance_name(args.netns), "probes": [asdict(p) for p in probes],
            "dns_servers": [str(s) for s in policy.dns.servers],
        }
        proc = subprocess.run([sys.executable, "-m", "ksbpf.audit", "worker"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=60 + timeout * (len(probes) + 10))
        if proc.returncode != 0:
            raise KsbpfError(f"audit worker failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
        out = json.loads(proc.stdout)
    finally:
        _remove_cgroup(cg)
    report["cgroup_removed"] = not cg.exists()
    by_id = {r["id"]: r for r in out["results"]}
    report["interfaces"] = [
        {"name": i.name, "index": i.index, "up": i.up, "targets": {a: sorted(w) for a, w in sorted(i.targets.items())},
         "neighbours_not_probed": i.skipped}
        for i in interfaces
    ]
    report["probes"] = [{**asdict(p), **by_id.get(p.id, {"outcome": "unproven", "how": "no result"})} for p in probes]
    report["allowed"] = allowed
    for t in out["tunnel"]:
        if t.get("ok"):
            t["via"] = _route_oif(args.netns, t["server"])
    report["tunnel"] = out["tunnel"]
    return judge(report)


def run_audit(args: argparse.Namespace) -> int:
    """`ksctl [--netns N] audit --config FILE [--target ADDR]... [--timeout S] [--json]`."""
    from ksbpf.errors import PolicyError

    if os.geteuid() != 0:
        print("ksctl audit: needs root (a cgroup, raw sockets, the drop counters)", file=sys.stderr)
        return EXIT_ERROR
    try:
        report = audit(args)
    except PolicyError:
        raise
    except (KsbpfError, OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"ksctl audit: could not run: {e}", file=sys.stderr)
        return EXIT_ERROR
    if getattr(args, "json", False):
        print(json.dumps(report, indent=1, default=str))
    else:
        render(report)
    return int(report["exit"])
