"""Control plane: `ksctl up` cold and warm, reload, `ksctl exempt`, `ksctl down`, each as
the user runs it (a fresh process), vs n entries; where the time goes inside one
process; BCC compile and load; the daemon's RSS at rest."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.configs import Engager
from ksbpf.errors import KsbpfError

_UP_MS_RE = re.compile(r" in (\d+(?:\.\d+)?) ms")


def parse_up_ms(text: str) -> float | None:
    """`ksbpf up (F) in 123 ms ...` -> 0.123 (seconds), or None."""
    m = _UP_MS_RE.search(text)
    return float(m.group(1)) / 1000 if m else None


def ksctl_argv() -> list[str]:
    script = Path(sys.executable).with_name("ksctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ksbpf.cli"]


def parse_importtime(text: str, top: int = 12) -> list[dict[str, Any]]:
    """`python -X importtime` stderr -> the `top` imports by cumulative time:
    {"module", "cumulative_ms", "self_ms", "depth"} (depth 0: imported by the script)."""
    rows: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|", 2)
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        raw = parts[2].rstrip()
        depth = max(0, (len(raw) - len(raw.lstrip()) - 1) // 2)
        rows.append({"module": raw.strip(), "cumulative_ms": int(parts[1]) / 1000.0,
                     "self_ms": int(parts[0]) / 1000.0, "depth": depth})
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows[:top]


@dataclass
class ControlPlane:
    engager: Engager
    workdir: Path

    @property
    def topo(self) -> Any:
        return self.engager.topo

    def _ksctl(self, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        argv = [*ksctl_argv(), "--netns", self.topo.client_ns, "--state-dir", str(self.engager.state_dir), *args]
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        return time.monotonic() - t0, r

    def _policy_file(self, n: int, extra: int = 0) -> Path:
        path = self.workdir / f"policy-{n}-{extra}.toml"
        if not path.exists():
            path.write_text(self.engager.policy_text(n, extra_endpoints=extra))
        return path

    def _sample(self, op: str, n: int, rnd: int, *args: str) -> dict[str, Any]:
        wall, r = self._ksctl(*args)
        s: dict[str, Any] = {"op": op, "n": n, "round": rnd, "wall_s": wall, "exit": r.returncode}
        reported = parse_up_ms(r.stdout)
        if reported is not None:
            s["reported_s"] = reported
        if r.returncode not in (0, 3):
            s["error"] = (r.stderr or r.stdout).strip()[-400:]
        elif r.returncode == 3:
            # Partial: some layer refused (named in stderr); the time still says something.
            s["partial"] = (r.stderr or "").strip()[-400:]
        return s

    def round(self, n: int, rnd: int) -> list[dict[str, Any]]:
        """cold up, warm up, reload (one more endpoint), exempt, unexempt, down."""
        out = []
        self._ksctl("down")
        base, changed = self._policy_file(n), self._policy_file(n, extra=1)
        out.append(self._sample("up_cold", n, rnd, "up", "--config", str(base)))
        out.append(self._sample("up_warm", n, rnd, "up", "--config", str(base)))
        out.append(self._sample("reload", n, rnd, "up", "--config", str(changed)))
        cg = f"{self.topo.cgroup_rel}/ex/runtime"
        (self.topo.cgroup_root / "ex" / "runtime").mkdir(parents=True, exist_ok=True)
        out.append(self._sample("exempt", n, rnd, "exempt", "--cgroup", cg, "--allow", "tcp/443"))
        out.append(self._sample("unexempt", n, rnd, "unexempt", "--cgroup", cg))
        out.append(self._sample("down", n, rnd, "down"))
        return out

    def breakdown(self, n: int, rnd: int) -> list[dict[str, Any]]:
        """In this process: parse, render, and each layer's apply, timed apart."""
        from ksbpf.linux.netns import netns
        from ksbpf.linux.nftables import NftLayer, uplink_interfaces
        from ksbpf.linux.routing import RoutingLayer
        from ksbpf.policy import loads_policy, merge_exemptions, parse_exemption
        from ksbpf.render.nft import render_nft, to_json

        text = self.engager.policy_text(n)
        ns = self.topo.client_ns
        t = {"op": "breakdown", "n": n, "round": rnd}
        t0 = time.monotonic()
        policy = loads_policy(text, "<bench>")
        t["parse_s"] = time.monotonic() - t0
        with netns(ns):
            uplinks = uplink_interfaces(policy)
        t0 = time.monotonic()
        batch = render_nft(policy, uplinks)
        t["nft_render_s"] = time.monotonic() - t0
        t["nft_json_bytes"] = len(to_json(batch))
        t["nft_commands"] = len(batch["nftables"])
        nft = NftLayer(ns)
        t0 = time.monotonic()
        nft.apply(policy)
        t["nft_apply_cold_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        nft.apply(policy)
        t["nft_apply_warm_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        nft.status()
        t["nft_status_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        nft.read_counters()
        t["nft_read_counters_s"] = time.monotonic() - t0
        one_more = loads_policy(self.engager.policy_text(n, extra_endpoints=1), "<bench>")
        t0 = time.monotonic()
        nft.apply(one_more)
        t["nft_apply_changes_s"] = time.monotonic() - t0  # what ksbpfd's reload sends
        nft.apply(policy)
        one = parse_exemption({"cgroup": f"{self.topo.cgroup_rel}/ex/runtime", "allow": ["tcp/443"]}, "<bench>", "")
        t0 = time.monotonic()
        nft.change_exemptions(policy, merge_exemptions(policy, (one,)))
        t["nft_change_exemption_s"] = time.monotonic() - t0
        routing = RoutingLayer(ns)
        t0 = time.monotonic()
        routing.apply(policy)
        t["routing_apply_s"] = time.monotonic() - t0
        try:
            bpf = self.engager._bpf()
            stats = bpf.apply(policy)
            t.update(bpf_apply_s=stats.apply_s, bcc_compile_s=stats.load.compile_s, bpf_load_s=stats.load.load_s,
                     bpf_loader_s=stats.load.loader_s, bpf_loader_peak_rss_kb=stats.load.peak_rss_kb)
            t0 = time.monotonic()
            bpf.update_exemptions(policy)
            t["bpf_update_exemptions_s"] = time.monotonic() - t0
        except KsbpfError as e:
            t["bpf_error"] = str(e)[-300:]
        finally:
            self.engager.reset("bpf")
            routing.reset()
            nft.reset()
        return [t]

    def process_floor(self, rounds: int = 3) -> dict[str, Any]:
        """What a ksctl process costs before it does anything: start-up and imports."""
        walls = []
        for _ in range(rounds):
            t0 = time.monotonic()
            subprocess.run([*ksctl_argv(), "--version"], capture_output=True)
            walls.append(time.monotonic() - t0)
        py = [sys.executable, "-X", "importtime", "-c",
              "import ksbpf.cli, ksbpf.linux.engine, ksbpf.linux.nftables, ksbpf.linux.routing, ksbpf.linux.bpf.layer"]
        r = subprocess.run(py, capture_output=True, text=True)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], capture_output=True)
        bare = time.monotonic() - t0
        imports = {}
        for mod in ("pyroute2", "nftables", "bcc"):
            ts = []
            for _ in range(rounds):
                t0 = time.monotonic()
                subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True)
                ts.append(time.monotonic() - t0 - bare)
            imports[mod] = sorted(ts)[len(ts) // 2]
        return {"ksctl_version_s": sorted(walls)[len(walls) // 2], "python_bare_s": bare,
                "import_s": imports, "importtime_top_ms": parse_importtime(r.stderr)}

    def daemon_round(self, n: int, rnd: int, settle_s: float = 3.0) -> list[dict[str, Any]]:
        """The same operations through a running ksbpfd: start until its control socket
        answers (it binds after engaging), RSS at rest, `ksctl exempt`/`unexempt` (which
        go to the daemon when one serves the netns), and reload requests with the same
        and a changed policy file. Ends the daemon by pid, then `ksctl down`."""
        try:
            from ksbpf.control import ControlClient
        except ImportError as e:
            return [{"op": "daemon_start", "n": n, "round": rnd, "error": f"ksbpf.control not available: {e}"}]
        self._ksctl("down")
        conf = self.workdir / f"daemon-policy-{n}.toml"
        listen = _free_port_listen()  # kept by the reload: a new address would time the metrics server's rebind
        conf.write_text(self.engager.policy_text(n, metrics_listen=listen))
        exe = Path(sys.executable).with_name("ksbpfd")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "ksbpf.daemon"]
        argv += ["--netns", self.topo.client_ns, "--state-dir", str(self.engager.state_dir), "--config", str(conf),
                 "--log-target", "stderr"]
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        logf = (self.workdir / f"ksbpfd-{n}-{rnd}.log").open("w")
        out: list[dict[str, Any]] = []
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
        base = {"n": n, "round": rnd}
        try:
            status = None
            while time.monotonic() - t0 < 180 and p.poll() is None:
                client = ControlClient.connect_if_running(self.topo.client_ns)
                if client is not None:
                    with client:
                        status = client.request({"op": "status"})
                    break
                time.sleep(0.01)
            if status is None:
                logf.flush()
                tail = (self.workdir / f"ksbpfd-{n}-{rnd}.log").read_text()[-400:]
                return [{**base, "op": "daemon_start", "error": f"ksbpfd did not answer (exit {p.poll()}): {tail}"}]
            layers = {k: bool(v.get("engaged")) for k, v in status.get("layers", {}).items()}
            out.append({**base, "op": "daemon_start", "wall_s": time.monotonic() - t0, "layers": layers,
                        **({"partial": "not engaged: " + ", ".join(k for k, v in layers.items() if not v)}
                           if not all(layers.values()) else {})})
            time.sleep(settle_s)
            out.append({**base, "op": "daemon_rss", **_rss(p.pid)})
            cg = f"{self.topo.cgroup_rel}/ex/runtime"
            (self.topo.cgroup_root / "ex" / "runtime").mkdir(parents=True, exist_ok=True)
            out.append(self._sample("exempt_daemon", n, rnd, "exempt", "--cgroup", cg, "--allow", "tcp/443"))
            out.append(self._sample("unexempt_daemon", n, rnd, "unexempt", "--cgroup", cg))
            for op, req in (("exempt_rpc", {"op": "exempt", "exemption": {"cgroup": cg, "allow": ["tcp/443"]}}),
                            ("unexempt_rpc", {"op": "unexempt", "cgroup": cg}),
                            ("reload_same_rpc", {"op": "reload"})):
                out.append(self._rpc(ControlClient, op, req, base))
            out.append(self._sample("up_daemon", n, rnd, "up", "--config", str(conf)))
            conf.write_text(self.engager.policy_text(n, extra_endpoints=1, metrics_listen=listen))
            out.append(self._rpc(ControlClient, "reload_rpc", {"op": "reload"}, base))
            conf.write_text(self.engager.policy_text(n, extra_endpoints=2, metrics_listen=listen))
            out.append(self._sample("reload_ksctl_daemon", n, rnd, "reload"))
            time.sleep(settle_s)
            out.append({**base, "op": "daemon_rss_after_reload", **_rss(p.pid)})
            return out
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            logf.close()
            self._ksctl("down")

    def _rpc(self, client_cls: Any, op: str, req: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        """One control-socket request from this process: the daemon's own time, no ksctl start-up."""
        t0 = time.monotonic()
        try:
            client = client_cls.connect_if_running(self.topo.client_ns)
            if client is None:
                return {**base, "op": op, "error": "no daemon answers"}
            with client:
                reply = client.request(req)
        except (KsbpfError, OSError) as e:
            return {**base, "op": op, "error": str(e)[-300:]}
        s: dict[str, Any] = {**base, "op": op, "wall_s": time.monotonic() - t0}
        if not reply.get("ok", True):
            s["error"] = str(reply)[-300:]
        return s


def _free_port_listen() -> str:
    """A loopback port nobody listens on now: other daemons on this machine use 9477."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out["rss_kb" if line.startswith("VmRSS") else "peak_rss_kb"] = int(line.split()[1])
    return out


def have_ksctl() -> bool:
    return bool(shutil.which(ksctl_argv()[0]) or Path(ksctl_argv()[0]).exists())
