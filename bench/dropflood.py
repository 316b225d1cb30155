"""The daemon's cost of a flood of dropped packets: ksbpfd engaged in the bench's client
netns (all layers, drop events on), a paced udpbench sender in the bench's client cgroup
sends UDP to a foreign DNS server out of the uplink (SO_BINDTODEVICE kbwan0), nftables
drops every datagram (reason `dns`) and the kfree_skb program reports them as events.

Over the sender's interval: the drop rate from the drop counters' delta (ksbpfd's own
metrics), ksbpfd's CPU from /proc/<pid>/stat (utime + stime, all its threads), and the
events lost (ksbpf_drop_events_lost_total's delta). The same interval with no sender
gives the daemon's CPU at rest (its periodic checks) to read the flood's against.

Parsers and the summary are pure; the rest runs ksbpfd and the sender, ended by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.configs import Engager
from bench.stats import median
from bench.topology import UPLINK_IF
from bench.workloads import WorkloadError, _join_cgroup, last_json

# A resolver outside the tunnel, on the uplink's subnet (TEST-NET-1), as in the events tests.
FOREIGN_DNS = "192.0.2.53"
DNS_PORT = 53
DROPPED = "ksbpf_dropped_packets_total"
LOST = "ksbpf_drop_events_lost_total"


# ------------------------------------------------------------------ parsers (pure)


def parse_drop_metrics(text: str) -> dict[str, Any]:
    """Prometheus text from ksbpfd -> {"dropped": {"layer/reason": packets} summed over the
    other labels, "dropped_total": all of them, "lost": events lost (None: not exported)}."""
    from prometheus_client.parser import text_string_to_metric_families

    dropped: dict[str, float] = {}
    lost: float | None = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == DROPPED:
                key = f"{s.labels.get('layer', '?')}/{s.labels.get('reason', '?')}"
                dropped[key] = dropped.get(key, 0.0) + s.value
            elif s.name == LOST:
                lost = (lost or 0.0) + s.value
    return {"dropped": dropped, "dropped_total": sum(dropped.values()), "lost": lost}


def cpu_ticks(stat: str) -> int:
    """/proc/<pid>/stat -> utime + stime in clock ticks. The command name (field 2) may
    hold spaces and parentheses: the fields are counted after its last ')'."""
    rest = stat[stat.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def interval(before: Mapping[str, Any], after: Mapping[str, Any], ticks_before: int, ticks_after: int,
             seconds: float, clk_tck: int) -> dict[str, Any]:
    """Two metric scrapes and two CPU readings around `seconds` -> the sample's figures."""
    if seconds <= 0:
        raise ValueError(f"interval of {seconds} s")
    delta = {k: after["dropped"].get(k, 0.0) - before["dropped"].get(k, 0.0)
             for k in sorted(set(before["dropped"]) | set(after["dropped"]))}
    lost = None if after.get("lost") is None else after["lost"] - (before.get("lost") or 0.0)
    return {
        "seconds": seconds,
        "dropped": {k: v for k, v in delta.items() if v},
        "drop_pps": sum(delta.values()) / seconds,
        "daemon_cpu_s": (ticks_after - ticks_before) / clk_tck,
        "daemon_cpu_pct": 100.0 * (ticks_after - ticks_before) / clk_tck / seconds,
        "events_lost": lost,
    }


def summarize(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Drop-flood samples ({"phase": "idle"|"flood", ...}) -> medians per phase, the lost
    events summed (any loss matters), or None when no flood sample succeeded."""
    flood = [s for s in samples if s.get("phase") == "flood" and "error" not in s]
    idle = [s for s in samples if s.get("phase") == "idle" and "error" not in s]
    if not flood:
        return None
    lost = [s["events_lost"] for s in flood if s.get("events_lost") is not None]
    return {
        "samples": len(flood),
        "target_pps": median(s["target_pps"] for s in flood),
        "sender_pps": median(s["sender_attempts_pps"] for s in flood),
        "drop_pps": median(s["drop_pps"] for s in flood),
        "daemon_cpu_pct": median(s["daemon_cpu_pct"] for s in flood),
        "daemon_cpu_pct_max": max(s["daemon_cpu_pct"] for s in flood),
        "idle_cpu_pct": median(s["daemon_cpu_pct"] for s in idle) if idle else None,
        "events_lost": sum(lost) if lost else None,
        "seconds": median(s["seconds"] for s in flood),
    }


# ------------------------------------------------------------------ the run


def _scrape(listen: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as r:
        return parse_drop_metrics(r.read().decode())


def _ticks(pid: int) -> int:
    return cpu_ticks(Path(f"/proc/{pid}/stat").read_text())


@dataclass
class DropFlood:
    engager: Engager
    udpbench: Path
    workdir: Path
    sender_cpu: int = 0

    @property
    def topo(self) -> Any:
        return self.engager.topo

    def _blast(self, seconds: float, pps: float) -> dict[str, Any]:
        cmd = ["taskset", "-c", str(self.sender_cpu), "ip", "netns", "exec", self.topo.client_ns,
               str(self.udpbench), "blast", FOREIGN_DNS, str(DNS_PORT), "64", str(seconds), "1", str(pps), UPLINK_IF]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 20,
                               preexec_fn=_join_cgroup(self.topo.client_cgroup))
        except subprocess.TimeoutExpired as e:
            raise WorkloadError(f"udpbench blast timed out after {seconds + 20:.0f}s") from e
        if r.returncode != 0:
            raise WorkloadError(f"udpbench blast exited {r.returncode}: {r.stderr[-300:]}")
        return last_json(r.stdout)

    def run(self, rounds: int, seconds: float, pps: float, log: Any, settle_s: float = 3.0) -> list[dict[str, Any]]:
        """ksbpfd up with an n=1 policy; per round an idle interval and a flood interval."""
        from bench.control import _free_port_listen
        from ksbpf.control import ControlClient

        conf = self.workdir / "dropflood-policy.toml"
        listen = _free_port_listen()
        conf.write_text(self.engager.policy_text(1, metrics_listen=listen))
        exe = Path(sys.executable).with_name("ksbpfd")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "ksbpf.daemon"]
        argv += ["--netns", self.topo.client_ns, "--state-dir", str(self.engager.state_dir), "--config", str(conf),
                 "--log-target", "stderr"]
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        logpath = self.workdir / "ksbpfd-dropflood.log"
        clk = os.sysconf("SC_CLK_TCK")
        out: list[dict[str, Any]] = []
        with logpath.open("w") as logf:
            p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
            try:
                status = None
                t0 = time.monotonic()
                while time.monotonic() - t0 < 180 and p.poll() is None:
                    client = ControlClient.connect_if_running(self.topo.client_ns)
                    if client is not None:
                        with client:
                            status = client.request({"op": "status"})
                        break
                    time.sleep(0.05)
                if status is None:
                    logf.flush()
                    return [{"phase": "flood", "error": f"ksbpfd did not answer (exit {p.poll()}): "
                             f"{logpath.read_text()[-400:]}"}]
                layers = {k: bool(v.get("engaged")) for k, v in status.get("layers", {}).items()}
                events = status.get("drop_events")
                log(f"drop flood: ksbpfd {p.pid} up, layers {layers}, drop events {events}")
                time.sleep(settle_s)
                for rnd in range(rounds):
                    for phase in ("idle", "flood"):
                        s: dict[str, Any] = {"round": rnd, "phase": phase, "layers": layers, "drop_events": events}
                        try:
                            before, ticks0, t_start = _scrape(listen), _ticks(p.pid), time.monotonic()
                            if phase == "flood":
                                tx = self._blast(seconds, pps)
                                s.update(target_pps=pps, sender_attempts_pps=float(tx["attempts_pps"]),
                                         sender_sent=int(tx["packets"]), sender_errors=int(tx["errors"]),
                                         sender_errno=int(tx.get("last_errno", 0)))
                            else:
                                time.sleep(seconds)
                            ticks1, t_end = _ticks(p.pid), time.monotonic()
                            s.update(interval(before, _scrape(listen), ticks0, ticks1, t_end - t_start, clk))
                        except (WorkloadError, OSError, ValueError, KeyError) as e:
                            s["error"] = str(e)[-300:]
                        out.append(s)
                        if "error" in s:
                            log(f"drop flood {rnd} {phase}: ERROR {s['error'][:160]}")
                        else:
                            log(f"drop flood {rnd} {phase}: {s['drop_pps'] / 1e3:.1f} kpps dropped, ksbpfd "
                                f"{s['daemon_cpu_pct']:.2f} % CPU, events lost {s['events_lost']}")
                        # What the flood's last second held back is flushed before the idle interval.
                        time.sleep(settle_s if phase == "flood" else 0)
                return out
            finally:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
