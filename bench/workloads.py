"""Data-plane workloads: TCP stream (iperf3), UDP packet rate and UDP request/response
latency (bench/udpbench.c). The sender runs in the client netns and the bench cgroup on
one CPU, the receiver in the server netns on another.

Parsers are pure and unit-tested; the rest spawns processes and ends them by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bench.topology import SERVER_ADDR, Topology

IPERF_PORT = 5201
PPS_PORT = 9000
RR_PORT = 9001


class WorkloadError(RuntimeError):
    pass


# ------------------------------------------------------------------ parsers (pure)


def last_json(text: str) -> dict[str, Any]:
    """The last line of `text` that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise WorkloadError(f"no JSON result in {text[-200:]!r}")


def parse_iperf3(text: str) -> dict[str, float]:
    """iperf3 -J output -> received Gbit/s, sender retransmits, and Gbit/s per CPU-second
    of the sender (softirq work done in its context included)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"iperf3 printed no JSON: {e}") from None
    if "error" in data:
        raise WorkloadError(f"iperf3: {data['error']}")
    end = data.get("end", {})
    received = end.get("sum_received", {})
    sent = end.get("sum_sent", {})
    if "bits_per_second" not in received:
        raise WorkloadError("iperf3 JSON has no end.sum_received.bits_per_second")
    gbps = received["bits_per_second"] / 1e9
    out = {"tcp_gbps": gbps, "tcp_retransmits": float(sent.get("retransmits", 0))}
    host_cpu = end.get("cpu_utilization_percent", {}).get("host_total")
    if host_cpu:
        out["tcp_gbps_per_cpu"] = gbps / (host_cpu / 100.0)
    return out


# ------------------------------------------------------------------ the C helper


def compile_udpbench(out_dir: Path) -> Path:
    """gcc -O2 bench/udpbench.c, at bench time (gcc and libc6-dev are bench dependencies)."""
    src = Path(str(resources.files("bench") / "udpbench.c"))
    out = out_dir / "udpbench"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise WorkloadError("no C compiler: apt-get install gcc libc6-dev")
    r = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise WorkloadError(f"compiling {src} failed:\n{r.stderr}")
    return out


# ------------------------------------------------------------------ processes


def _join_cgroup(cgroup: Path) -> Any:
    procs = cgroup / "cgroup.procs"

    def move() -> None:
        # Before `ip netns exec`: it remounts /sys, and the cgroup2 mount is gone after.
        procs.write_text(f"{os.getpid()}\n")

    return move


@dataclass
class Workloads:
    topo: Topology
    udpbench: Path
    sender_cpu: int = 0
    receiver_cpu: int = 1
    _servers: list[subprocess.Popen[str]] = field(default_factory=list)

    def _client(self, argv: list[str], timeout: float) -> str:
        assert self.topo.cgroup_root is not None
        cmd = ["taskset", "-c", str(self.sender_cpu), "ip", "netns", "exec", self.topo.client_ns, *argv]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               preexec_fn=_join_cgroup(self.topo.client_cgroup))
        except subprocess.TimeoutExpired as e:
            raise WorkloadError(f"{argv[0]} timed out after {timeout:.0f}s") from e
        if r.returncode != 0:
            raise WorkloadError(f"{' '.join(argv)} exited {r.returncode}: {(r.stderr or r.stdout)[-300:]}")
        return r.stdout

    def _server(self, argv: list[str]) -> subprocess.Popen[str]:
        cmd = ["taskset", "-c", str(self.receiver_cpu), "ip", "netns", "exec", self.topo.server_ns, *argv]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def _stop(p: subprocess.Popen[str]) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()

    def start_servers(self) -> None:
        self.stop_servers()
        self._servers = [
            self._server(["iperf3", "-s", "-p", str(IPERF_PORT)]),
            self._server([str(self.udpbench), "echo", str(RR_PORT)]),
        ]
        time.sleep(0.3)
        for p in self._servers:
            if p.poll() is not None:
                raise WorkloadError(f"server {p.args!r} exited: {p.stderr.read() if p.stderr else ''}")
        self._rr(0.2, 64)  # the path works before anything is measured

    def stop_servers(self) -> None:
        for p in self._servers:
            self._stop(p)
        self._servers = []

    def _with_restart(self, fn: Any, *args: Any) -> dict[str, float]:
        try:
            return dict(fn(*args))
        except WorkloadError:
            # iperf3's server can wedge after a client is killed: one fresh try.
            self.start_servers()
            return dict(fn(*args))

    # ------------------------------------------------------------------ the workloads

    def tcp_stream(self, seconds: float) -> dict[str, float]:
        return self._with_restart(self._tcp_stream, seconds)

    def _tcp_stream(self, seconds: float) -> dict[str, float]:
        secs = max(1, round(seconds))
        argv = ["iperf3", "-c", SERVER_ADDR, "-p", str(IPERF_PORT), "-t", str(secs), "-J"]
        if secs >= 3:
            argv += ["-O", "1"]  # slow start out of the average
        return parse_iperf3(self._client(argv, timeout=secs + 20))

    def udp_pps(self, seconds: float, size: int = 64, batch: int = 32) -> dict[str, float]:
        sink = self._server([str(self.udpbench), "sink", str(PPS_PORT), str(seconds + 5)])
        try:
            assert sink.stdout is not None
            ready = sink.stdout.readline()
            if '"ready"' not in ready:
                raise WorkloadError(f"udpbench sink did not start: {sink.stderr.read() if sink.stderr else ''}")
            tx = last_json(self._client(
                [str(self.udpbench), "blast", SERVER_ADDR, str(PPS_PORT), str(size), str(seconds), str(batch)],
                timeout=seconds + 20,
            ))
            out, _ = sink.communicate(timeout=10)
            rx = last_json(out)
        finally:
            self._stop(sink)
        return {"udp_tx_pps": float(tx["pps"]), "udp_rx_pps": float(rx["pps"]),
                "udp_pps_per_cpu": float(tx.get("pps_per_cpu", 0.0)), "udp_tx_errors": float(tx.get("errors", 0))}

    def udp_profile(self, seconds: float, perf: str, data: Path, size: int = 64, batch: int = 32) -> dict[str, Any]:
        """The UDP sender under `perf record`: kernel symbol shares of its CPU time, the
        kill switch's parts (bench.profile.CATEGORIES) and their nanoseconds per packet."""
        from bench import profile

        assert self.topo.cgroup_root is not None
        sink = self._server([str(self.udpbench), "sink", str(PPS_PORT), str(seconds + 10)])
        blast: subprocess.Popen[str] | None = None
        try:
            assert sink.stdout is not None
            sink.stdout.readline()
            # taskset and `ip netns exec` exec in place: the pid is udpbench's.
            blast = subprocess.Popen(
                ["taskset", "-c", str(self.sender_cpu), "ip", "netns", "exec", self.topo.client_ns,
                 str(self.udpbench), "blast", SERVER_ADDR, str(PPS_PORT), str(size), str(seconds + 1.0), str(batch)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=_join_cgroup(self.topo.client_cgroup))
            time.sleep(0.4)
            profile.record(blast.pid, seconds, data, perf)
            out, _ = blast.communicate(timeout=seconds + 20)
            tx = last_json(out)
        finally:
            if blast is not None:
                self._stop(blast)
            self._stop(sink)
        symbols = profile.report(data, perf)
        data.unlink(missing_ok=True)
        ns_per_packet = float(tx["cpu_s"]) / float(tx["packets"]) * 1e9
        parts = profile.classify(symbols)
        return {
            "ns_per_packet": ns_per_packet,
            "share_pct": parts,
            "ns": {k: v / 100 * ns_per_packet for k, v in parts.items()},
            "top": {k: profile.top_symbols(symbols, k) for k in parts if parts[k] > 0},
        }

    def rr(self, seconds: float, size: int = 64) -> dict[str, float]:
        return self._with_restart(self._rr, seconds, size)

    def _rr(self, seconds: float, size: int) -> dict[str, float]:
        r = last_json(self._client(
            [str(self.udpbench), "rr", SERVER_ADDR, str(RR_PORT), str(size), str(seconds)], timeout=seconds + 20
        ))
        return {"rr_p50_us": float(r["p50_us"]), "rr_p99_us": float(r["p99_us"]),
                "rr_mean_us": float(r["mean_us"]), "rr_requests": float(r["requests"])}


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ksbpf-bench-"))
