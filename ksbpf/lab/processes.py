"""Commands run in a lab namespace (and cgroup), and the lab's own processes: spawned into
a session of their own, recorded with their start time in the lab's state file (so that
another process, `ksctl lab down`, finds them again), and ended by pid only while the pid
is still that process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksbpf.errors import KsbpfError
from ksbpf.lab.addresses import STATE_DIR
from ksbpf.linux.cgroup import cgroup2_mount

AGENT = Path(__file__).with_name("agent.py")


class LabError(KsbpfError):
    """The lab could not be built, driven or torn down."""


@dataclass
class Proc:
    """One of the lab's processes: its pid is trusted only while its start time matches."""

    role: str
    pid: int
    start: int

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "pid": self.pid, "start": self.start}


def run_cmd(
    argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(argv), input=input, text=True, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(argv)}: {e}") from None
    if check and cp.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {(cp.stderr or cp.stdout).strip()}")
    return cp


def ip_batch(ns: str, lines: Sequence[str], *, family: str = "") -> None:
    argv = ["ip", *([family] if family else []), "-n", ns, "-batch", "-"]
    run_cmd(argv, input="\n".join(lines) + "\n")


def sysctl(ns: str, settings: Mapping[str, str | int]) -> None:
    run_cmd(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def in_netns(ns: str | None, argv: Sequence[str], cgroup: Path | None = None) -> list[str]:
    """argv run in `ns`, after joining `cgroup`: the cgroup is joined first because
    `ip netns exec` remounts /sys and hides the cgroup2 mount. A shell does the joining,
    not a preexec_fn, which is unsafe in threaded callers (the daemon, parallel probes)."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    if cgroup is None:
        return cmd
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *cmd]


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[19])


def protected_pids() -> set[int]:
    """This process and its ancestors: never killed, whatever namespace they are in."""
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nft_load(ns: str, ruleset: str) -> None:
    """Load `ruleset` in `ns` (one transaction)."""
    run_cmd(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset)


class LabProcesses:
    """The lab's state (names, namespaces, cgroup, keys, processes), saved to its state file
    on every change, and the processes it runs. LabTopology and LabTraffic build on it."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.name: str = state["name"]
        self.client: str = state["client"]
        self.server: str = state["server"]
        self.target: str = state["target"]
        self.routed: str | None = state.get("routed")
        self.wg: str = state["wg"]
        self.wg_server: str = state["wg_server"]
        self.state_dir = Path(state["state_dir"])
        self.cgroup_root: Path | None = Path(state["cgroup_root"]) if state.get("cgroup_root") else None
        self.metrics_port: int = state["metrics_port"]
        self.keys: dict[str, str] = state.get("keys", {})
        self._procs = [Proc(**p) for p in state.get("procs", [])]
        self._namespaces: list[str] = list(state.get("namespaces", []))
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self.closed = False

    # ----------------------------------------------------------------- state

    @staticmethod
    def state_file(name: str) -> Path:
        return STATE_DIR / f"{name}.json"

    def _state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "client": self.client,
            "server": self.server,
            "target": self.target,
            "routed": self.routed,
            "wg": self.wg,
            "wg_server": self.wg_server,
            "state_dir": str(self.state_dir),
            "cgroup_root": str(self.cgroup_root) if self.cgroup_root else None,
            "metrics_port": self.metrics_port,
            "keys": self.keys,
            "procs": [p.as_dict() for p in self._procs],
            "namespaces": self._namespaces,
        }

    def _save(self) -> None:
        if self.closed:
            return
        path = self.state_file(self.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state(), indent=1))
        os.replace(tmp, path)

    # ----------------------------------------------------------------- processes

    def _spawn(self, role: str, ns: str | None, argv: Sequence[str], *, cgroup: Path | None = None) -> Proc:
        with open(self.state_dir / f"{role}.log", "ab") as log:
            # A session of its own: `ksctl lab up` exits and the lab's processes stay.
            p = subprocess.Popen(
                in_netns(ns, argv, cgroup), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        st = proc_stat(p.pid)
        proc = Proc(role, p.pid, st[1] if st else 0)
        self._children[p.pid] = p
        self._procs = [q for q in self._procs if q.role != role] + [proc]
        self._save()
        return proc

    def processes(self) -> dict[str, int]:
        """role -> pid of every process the lab runs (wg-client, wg-server,
        services-target, services-server, traffic-PID)."""
        return {p.role: p.pid for p in self._procs}

    def _proc(self, role: str) -> Proc | None:
        return next((p for p in self._procs if p.role == role), None)

    def _alive(self, proc: Proc | None) -> bool:
        if proc is None:
            return False
        child = self._children.get(proc.pid)
        if child is not None and child.poll() is not None:
            return False
        st = proc_stat(proc.pid)
        return st is not None and st[1] == proc.start and st[0] != "Z"

    def _stop(self, proc: Proc, *, sig: int = signal.SIGTERM, grace: float = 2.0) -> None:
        """End one of the lab's processes by pid, only if the pid is still that process."""
        for s in (sig, signal.SIGKILL):
            if not self._alive(proc):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, s)
            deadline = time.monotonic() + grace
            while self._alive(proc) and time.monotonic() < deadline:
                time.sleep(0.02)
        child = self._children.pop(proc.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        self._procs = [q for q in self._procs if q is not proc]
        self._save()

    def _wait(self, cond: Any, what: str, *, role: str | None = None, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if role is not None and not self._alive(self._proc(role)):
                raise LabError(f"{what}: process {role} died: {self._log_tail(role)}")
            time.sleep(0.02)
        raise LabError(f"{what}: not ready after {timeout:.0f} s: {self._log_tail(role) if role else ''}")

    def _log_tail(self, role: str) -> str:
        try:
            return " | ".join((self.state_dir / f"{role}.log").read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    # ----------------------------------------------------------------- commands

    def _agent(self, *args: str) -> list[str]:
        return [sys.executable or "python3", "-I", "-S", str(AGENT), *args]

    def run(
        self, argv: Sequence[str], *, netns: str | None = None, cgroup: Path | str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Any command in the client namespace (or `netns`), optionally in a cgroup."""
        cmd = in_netns(netns or self.client, argv, self._cgroup_path(cgroup))
        try:
            return subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"{' '.join(argv)}: timed out after {timeout} s") from e

    def _cgroup_path(self, cgroup: Path | str | None) -> Path | None:
        if cgroup is None or isinstance(cgroup, Path):
            return cgroup
        return cgroup2_mount() / cgroup.strip("/")
