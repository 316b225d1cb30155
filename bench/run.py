"""`python -m bench.run`: measure ksbpf's per-packet cost, its scale with n entries and its
control-plane latency against no filtering and two baselines, in one interleaved run.

Run as root on a machine you may load; everything happens in namespaces and a cgroup the
bench creates and removes. `--quick` is a smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import dropflood, profile, report
from bench.configs import CONFIGS, SCALED, ConfigError, Engager
from bench.control import ControlPlane
from bench.topology import Topology
from bench.workloads import WorkloadError, Workloads, compile_udpbench, scratch_dir
from ksbpf.errors import KsbpfError

DEFAULT_NS = (1, 100, 1000, 10000)


def _cmd(*argv: str) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip()


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    os_name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    repo = Path(__file__).resolve().parents[1]
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_mb": mem_kb // 1024,
        "os": os_name,
        "kernel": platform.release(),
        "virtualization": _cmd("systemd-detect-virt") or "unknown",
        "python": platform.python_version(),
        "nft": _cmd("nft", "--version"),
        "iperf3": _cmd("iperf3", "--version").splitlines()[0] if _cmd("iperf3", "--version") else "",
        "bcc": _cmd("dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc"),
        "gcc": _cmd("gcc", "-dumpfullversion"),
        # A tree exported with `git archive` has no .git: bench it with a COMMIT file beside.
        "ksbpf_commit": _cmd("git", "-C", str(repo), "rev-parse", "--short", "HEAD")
        or ((repo / "COMMIT").read_text().strip() if (repo / "COMMIT").exists() else "unknown"),
        "ksbpf_tree_dirty": bool(_cmd("git", "-C", str(repo), "status", "--porcelain", "--", "ksbpf", "bpf")),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def plan(configs: list[str], ns: list[int], rnd: int, seed: int) -> list[tuple[str, int]]:
    """One round: every configuration at n = the smallest, the scaled ones at every n,
    shuffled per round, with no filtering measured between every two of them."""
    n0 = min(ns)
    items = [(c, n0) for c in configs if c != "none"]
    items += [(c, n) for c in configs if c in SCALED for n in ns if n != n0]
    random.Random(seed * 1000 + rnd).shuffle(items)
    out: list[tuple[str, int]] = [("none", 0)]
    for item in items:
        out += [item, ("none", 0)]
    return out


def _clean(eng: Engager, sample: dict[str, Any], log: Any) -> None:
    """Nothing may be enforcing before a sample; if something is, say so and remove it."""
    left = eng.leftovers()
    if left:
        sample["leftovers"] = left
        log(f"leftovers before {sample['config']} n={sample['n']}: {left}; removing")
        eng.reset_all()


def dataplane_round(args: argparse.Namespace, eng: Engager, wl: Workloads, rnd: int, seq0: int,
                    log: Any) -> list[dict[str, Any]]:
    samples = []
    for k, (config, n) in enumerate(plan(args.configs, args.n, rnd, args.seed)):
        s: dict[str, Any] = {"round": rnd, "seq": seq0 + k, "config": config, "n": n, "t": time.time()}
        _clean(eng, s, log)
        try:
            s["engage"] = eng.engage(config, n)
            try:
                m: dict[str, float] = {}
                if "tcp" in args.workloads:
                    m.update(wl.tcp_stream(args.seconds))
                if "udp" in args.workloads:
                    m.update(wl.udp_pps(args.seconds, size=args.udp_size, batch=args.udp_batch))
                if "rr" in args.workloads:
                    m.update(wl.rr(args.seconds, size=args.udp_size))
                s["metrics"] = m
            finally:
                eng.reset(config)
        except (ConfigError, WorkloadError, KsbpfError) as e:
            s["error"] = str(e)[-500:]
            s["metrics"] = {}
        m = s["metrics"]
        log(f"round {rnd} {config:>8} n={n:<6} " + (
            f"ERROR {s['error'][:120]}" if "error" in s else "  ".join(filter(None, (
                f"tcp {m['tcp_gbps']:.2f} Gb/s ({m.get('tcp_gbps_per_cpu', 0):.2f}/cpu-s)" if "tcp_gbps" in m else "",
                f"udp {m['udp_tx_pps'] / 1e3:.0f} kpps ({m['udp_pps_per_cpu'] / 1e3:.0f}/cpu-s)" if "udp_tx_pps" in m else "",
                f"rr p50 {m['rr_p50_us']:.1f} p99 {m['rr_p99_us']:.1f} us" if "rr_p50_us" in m else "")))))
        samples.append(s)
    return samples


def profile_round(args: argparse.Namespace, eng: Engager, wl: Workloads, perf: str, work: Path, rnd: int,
                  log: Any) -> list[dict[str, Any]]:
    """Each configuration once under perf (UDP sender), in this round's shuffled order."""
    samples = []
    for config, n in [("none", 0), *plan(args.configs, args.n, rnd + 100, args.seed)[1::2], ("none", 0)]:
        s: dict[str, Any] = {"round": rnd, "config": config, "n": n}
        _clean(eng, s, log)
        try:
            eng.engage(config, n)
            try:
                s.update(wl.udp_profile(args.profile_seconds, perf, work / "perf.data",
                                        size=args.udp_size, batch=args.udp_batch))
            finally:
                eng.reset(config)
            log(f"profile {rnd} {config:>8} n={n:<6} {s['ns_per_packet']:.0f} ns/packet: " +
                ", ".join(f"{k} {v:.0f}" for k, v in s["ns"].items() if v >= 0.5))
        except (ConfigError, WorkloadError, KsbpfError, subprocess.CalledProcessError) as e:
            s["error"] = str(e)[-300:]
            log(f"profile {rnd} {config:>8} n={n:<6} ERROR {s['error'][:120]}")
        samples.append(s)
    return samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1 s per workload, n in {1, 1000}, 1 control round")
    p.add_argument("--rounds", type=int, default=5, help="data-plane rounds (default 5)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per workload and sample (default 2)")
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_NS),
                   help="entry counts, comma-separated (default 1,100,1000,10000)")
    p.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS),
                   help=f"configurations (default {','.join(CONFIGS)})")
    p.add_argument("--control-rounds", type=int, default=5, help="control-plane rounds (default 5)")
    p.add_argument("--profile-rounds", type=int, default=2,
                   help="rounds of perf profiles of the UDP sender per configuration (default 2; 0: none)")
    p.add_argument("--profile-seconds", type=float, default=3.0)
    p.add_argument("--drop-rounds", type=int, default=3,
                   help="rounds of the drop flood: ksbpfd's CPU while a sender's packets are dropped "
                        "(default 3; 0: none)")
    p.add_argument("--drop-seconds", type=float, default=10.0, help="seconds per drop-flood interval (default 10)")
    p.add_argument("--drop-pps", type=float, default=100_000.0,
                   help="packets per second the drop-flood sender aims at (default 100000)")
    p.add_argument("--skip-dataplane", action="store_true")
    p.add_argument("--skip-control", action="store_true")
    p.add_argument("--no-daemon", action="store_true", help="skip the control plane through ksbpfd")
    p.add_argument("--reuse-dataplane", type=Path, metavar="JSON",
                   help="take data-plane samples and profiles from this earlier results file (implies "
                        "--skip-dataplane); its machine and params are kept under dataplane_run")
    p.add_argument("--workloads", type=lambda s: s.split(","), default=["tcp", "udp", "rr"],
                   help="data-plane workloads, comma-separated (default tcp,udp,rr)")
    p.add_argument("--tag", default="", help="suffix of the results file name, e.g. tcp-long")
    p.add_argument("--udp-size", type=int, default=64, help="UDP payload bytes (default 64)")
    p.add_argument("--udp-batch", type=int, default=32, help="datagrams per sendmmsg (default 32)")
    p.add_argument("--sender-cpu", type=int, default=0)
    p.add_argument("--receiver-cpu", type=int, default=1)
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README's benchmark table")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.control_rounds, args.profile_rounds = 1, 1.0, 1, 1
        args.profile_seconds, args.drop_rounds, args.drop_seconds = 1.0, 1, 2.0
        if args.n == list(DEFAULT_NS):
            args.n = [1, 1000]
        args.no_readme = True
    if args.reuse_dataplane:
        args.skip_dataplane = True
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    if "none" not in args.configs:
        args.configs = ["none", *args.configs]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (it builds network namespaces and cgroups)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    work = scratch_dir()
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "schema": 1,
        "date": started.isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "quick": args.quick,
        "machine": machine(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataplane": [],
        "profile": [],
        "control": [],
        "drops": [],
        "notes": [],
    }
    out_path = report.results_path(args.results, started, platform.release(), quick=args.quick, tag=args.tag)
    if args.reuse_dataplane:
        earlier = json.loads(args.reuse_dataplane.read_text())
        results["dataplane"], results["profile"] = earlier["dataplane"], earlier.get("profile", [])
        results["dataplane_run"] = {k: earlier.get(k) for k in ("date", "finished", "machine", "params")}
        for key in ("rounds", "seconds", "n", "configs", "udp_size", "udp_batch"):
            results["params"][key] = earlier["params"].get(key)
        results["notes"].append(f"data plane and profiles from the run of {earlier.get('date')} "
                                f"(commit {earlier.get('machine', {}).get('ksbpf_commit')}); control plane from this run "
                                f"(commit {results['machine']['ksbpf_commit']})")
    try:
        udpbench = compile_udpbench(work)
        with Topology() as topo:
            eng = Engager(topo, work / "state")
            topo.make_exempt_cgroups(max(args.n))
            try:
                if not args.skip_dataplane:
                    wl = Workloads(topo, udpbench, args.sender_cpu, args.receiver_cpu)
                    wl.start_servers()
                    try:
                        for rnd in range(args.rounds):
                            results["dataplane"] += dataplane_round(args, eng, wl, rnd, len(results["dataplane"]), log)
                            report.write_results(results, out_path)
                        ok, perf = profile.perf_available()
                        if not ok:
                            results["notes"].append(f"no profiles: {perf}")
                        for rnd in range(args.profile_rounds if ok else 0):
                            results["profile"] += profile_round(args, eng, wl, perf, work, rnd, log)
                            report.write_results(results, out_path)
                    finally:
                        wl.stop_servers()
                if args.drop_rounds > 0:
                    _clean(eng, {"config": "ksbpf", "n": 1}, log)
                    try:
                        results["drops"] = dropflood.DropFlood(eng, udpbench, work, args.sender_cpu).run(
                            args.drop_rounds, args.drop_seconds, args.drop_pps, log)
                    finally:
                        eng.reset("ksbpf")
                    report.write_results(results, out_path)
                if not args.skip_control:
                    cp = ControlPlane(eng, work)
                    results["process"] = cp.process_floor()
                    for rnd in range(args.control_rounds):
                        for n in args.n:
                            log(f"control round {rnd} n={n}")
                            topo.set_exempt_cgroups(n)
                            results["control"] += cp.round(n, rnd)
                            results["control"] += cp.breakdown(n, rnd)
                            if not args.no_daemon:
                                results["control"] += cp.daemon_round(n, rnd)
                        report.write_results(results, out_path)
            finally:
                eng.reset_all()
    finally:
        results["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        report.write_results(results, out_path)
        log(f"results: {out_path}")
    pngs = report.plots(results, out_path.with_suffix(""))
    for png in pngs:
        log(f"plot: {png}")
    table = report.render_markdown(results, out_path, pngs)
    print(table)
    if not args.no_readme:
        if report.update_readme(args.readme, table):
            log(f"README table rewritten: {args.readme}")
        else:
            log(f"README has no bench markers; table not written ({args.readme})")
    print(json.dumps(report.targets(results), indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
