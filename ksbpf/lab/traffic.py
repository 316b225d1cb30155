"""What the lab sends and counts: one-shot probes (tcp, udp, dns, ping, raw frames) through
the agent, a traffic generator that runs until stopped, and the far-side counters on the
server's uplink that tell what left the client outside the tunnel."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import secrets
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksbpf.lab.addresses import (
    CLIENT_V4,
    COUNTER_TABLE,
    ECHO_PORT,
    TARGET_V4,
    TARGET_V6,
    TUN_SERVER_V4,
    UPLINK,
    WHOAMI_PORT,
)
from ksbpf.lab.processes import LabError, LabProcesses, Proc, in_netns, nft_load, proc_stat, run_cmd
from ksbpf.lab.rulesets import Counters, counter_ruleset, parse_counters


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return ("ok" if self.ok else "failed") + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class TrafficStats:
    """Per flow ("udp 198.51.100.10 7"): sent, received, errors, last_error."""

    flows: Mapping[str, Mapping[str, Any]]

    def _sum(self, key: str) -> int:
        return sum(int(f.get(key, 0)) for f in self.flows.values())

    @property
    def sent(self) -> int:
        return self._sum("sent")

    @property
    def received(self) -> int:
        return self._sum("received")

    @property
    def errors(self) -> int:
        return self._sum("errors")


DEFAULT_TRAFFIC = (
    f"udp,{TARGET_V4},{ECHO_PORT}",
    f"udp,{TARGET_V6},{ECHO_PORT}",
    f"tcp,{TARGET_V4},{ECHO_PORT}",
    f"stream,{TARGET_V4},{ECHO_PORT}",
    f"dns,{TUN_SERVER_V4},53",
)


class Traffic:
    """A running traffic generator (see Lab.traffic); a context manager that stops it."""

    def __init__(self, lab: LabProcesses, popen: subprocess.Popen[str], proc: Proc) -> None:
        self.lab = lab
        self.popen = popen
        self.proc = proc
        self.stats: TrafficStats | None = None

    def stop(self) -> TrafficStats:
        if self.stats is not None:
            return self.stats
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            out, _ = self.popen.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, _ = self.popen.communicate()
        self.lab._procs = [q for q in self.lab._procs if q is not self.proc]
        self.lab._save()
        try:
            flows = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            flows = {}
        self.stats = TrafficStats(flows)
        return self.stats

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LabTraffic(LabProcesses):
    """Probes, traffic and counters, from the client (or any lab namespace and cgroup)."""

    # ----------------------------------------------------------------- counters

    def reset_counters(self) -> None:
        """Start counting afresh (reloads the counter table in one transaction)."""
        nft_load(self.server, counter_ruleset())

    def counters(self) -> Counters:
        cp = run_cmd(["ip", "netns", "exec", self.server, "nft", "-j", "list", "table", "netdev", COUNTER_TABLE])
        try:
            return parse_counters(json.loads(cp.stdout))
        except (ValueError, KeyError, TypeError) as e:
            raise LabError(f"cannot read the leak counter: {e}") from None

    def leaks(self) -> int:
        """Packets the server received on its uplink other than the tunnel's own encrypted
        traffic, ARP and neighbour discovery, since the last reset."""
        return self.counters().leaks

    def leak_details(self) -> list[str]:
        """One line per leaked flow: 'udp 192.0.2.2 → 198.51.100.10:7 ×3'."""
        return list(self.counters().details)

    def tunnel_packets(self) -> int:
        """Encrypted WireGuard packets from the client's tunnel port since the last reset."""
        return self.counters().tunnel

    def probe(
        self,
        kind: str,
        *args: str | int,
        netns: str | None = None,
        cgroup: Path | str | None = None,
        timeout: float = 1.0,
        mark: int | None = None,
        device: str | None = None,
        bind: str | None = None,
        sport: int | None = None,
    ) -> ProbeResult:
        """One lab_agent probe (tcp, udp, dns, ping) from the client (or `netns`)."""
        opts = ["--timeout", str(timeout)]
        if mark:
            opts += ["--mark", hex(mark)]
        if device:
            opts += ["--device", device]
        if bind:
            opts += ["--bind", bind]
        if sport:
            opts += ["--sport", str(sport)]
        cp = self.run(self._agent(kind, *opts, *map(str, args)), netns=netns, cgroup=cgroup, timeout=timeout + 10)
        try:
            out = json.loads(cp.stdout.strip().splitlines()[-1])
            return ProbeResult(bool(out["ok"]), str(out["detail"]))
        except (ValueError, IndexError, KeyError):
            return ProbeResult(False, f"probe failed: {(cp.stderr or cp.stdout).strip()[-200:]}")

    def tcp_echo(self, addr: str = TARGET_V4, port: int = ECHO_PORT, **opts: Any) -> ProbeResult:
        """Connect, send a line, get it back. opts: netns, cgroup, timeout, mark, device, bind, sport."""
        return self.probe("tcp", addr, port, **opts)

    def udp_echo(self, addr: str = TARGET_V4, port: int = ECHO_PORT, **opts: Any) -> ProbeResult:
        return self.probe("udp", addr, port, **opts)

    def whoami(self, addr: str = TARGET_V4, *, proto: str = "tcp", **opts: Any) -> ProbeResult:
        """The source address the target saw (detail), over tcp or udp."""
        return self.probe(proto, addr, WHOAMI_PORT, **opts)

    def dns_query(
        self, server: str = TUN_SERVER_V4, name: str = "lab.example", *, qtype: str = "A", tcp: bool = False,
        **opts: Any,
    ) -> ProbeResult:
        """detail is the answer: DNS_TUNNEL_A/AAAA from the tunnel's resolver,
        DNS_OUTSIDE_A/AAAA from the ones outside it."""
        extra = ["--qtype", qtype, *(["--tcp"] if tcp else [])]
        return self.probe("dns", server, name, *extra, **opts)

    def ping(self, addr: str = TARGET_V4, **opts: Any) -> ProbeResult:
        return self.probe("ping", addr, **opts)

    def raw_frames(
        self, addr: str = TARGET_V4, port: int = ECHO_PORT, *, count: int = 1, device: str = UPLINK,
        src: str = CLIENT_V4, **opts: Any,
    ) -> ProbeResult:
        """Write `count` broadcast Ethernet frames carrying IPv4/UDP to `device` through an
        AF_PACKET socket, past routing and the IP stack's hooks. ok means written, not
        delivered: count what arrived with leaks()."""
        return self.probe("raw", src, addr, port, "--count", count, device=device, **opts)

    def tunnel_checks(self, **opts: Any) -> dict[str, ProbeResult]:
        """tcp, udp, ipv6 and dns through the tunnel, in parallel."""
        calls = {
            "tcp": lambda: self.tcp_echo(TARGET_V4, **opts),
            "udp": lambda: self.udp_echo(TARGET_V4, **opts),
            "ipv6": lambda: self.tcp_echo(TARGET_V6, **opts),
            "dns": lambda: self.dns_query(TUN_SERVER_V4, **opts),
        }
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            futures = {k: pool.submit(fn) for k, fn in calls.items()}
            return {k: f.result() for k, f in futures.items()}

    def traffic(
        self,
        targets: Sequence[str] | None = None,
        *,
        netns: str | None = None,
        cgroup: Path | str | None = None,
        interval: float = 0.02,
        mark: int | None = None,
    ) -> Traffic:
        """Start sending every `interval` to each target ("KIND,ADDR,PORT"; KIND udp,
        tcp (new connections), stream (one connection) or dns) until `.stop()`."""
        targets = list(targets or DEFAULT_TRAFFIC)
        ready = self.state_dir / f"traffic-{secrets.token_hex(3)}.ready"
        argv = ["traffic", "--interval", str(interval), "--ready", str(ready)]
        argv += ["--mark", hex(mark)] if mark else []
        for target in targets:
            argv += ["--target", target]
        cmd = in_netns(netns or self.client, self._agent(*argv), self._cgroup_path(cgroup))
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        st = proc_stat(p.pid)
        proc = Proc(f"traffic-{p.pid}", p.pid, st[1] if st else 0)
        self._procs.append(proc)
        self._save()
        t = Traffic(self, p, proc)
        try:
            self._wait(lambda: ready.exists() or p.poll() is not None, "traffic generator")
        except BaseException:
            t.stop()
            raise
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        if p.poll() is not None:
            raise LabError(f"traffic generator exited: {p.stderr.read().strip() if p.stderr else ''}")
        return t

    def _warm_up(self) -> None:
        """The first packet through the tunnel starts the handshake; wait for it here,
        not in the first test."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.udp_echo(TARGET_V4, timeout=0.5):
                return
        raise LabError(f"no traffic through the tunnel {self.wg} after 10 s; see {self.state_dir}/*.log")
