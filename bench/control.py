"""Control plane: `ksctl up` cold and warm, reload, `ksctl exempt`, `ksctl down`, each as
the user runs it (a fresh process), vs n entries; where the time goes inside one
process; BCC compile and load; the daemon's RSS at rest."""

from __future__ import annotations

import os
import re
import shutil
import signal
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
    rows = []
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
        from ksbpf.policy import loads_policy
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
        t0 = time.monotonic()
        nft.update_exemptions(policy)
        t["nft_update_exemptions_s"] = time.monotonic() - t0
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
              "import ksbpf.cli, ksbpf.linux.engine, ksbpf.linux.nftables, ksbpf.linux.routing, ksbpf.linux.bpf"]
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

    def daemon_rss(self, n: int, settle_s: float = 5.0) -> dict[str, Any]:
        """Start ksbpfd for the client netns, let it settle, read VmRSS; end it by pid."""
        try:
            import ksbpf.daemon  # noqa: F401
        except ImportError as e:
            return {"n": n, "error": f"ksbpf.daemon not available: {e}"}
        exe = Path(sys.executable).with_name("ksbpfd")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "ksbpf.daemon"]
        argv += ["--netns", self.topo.client_ns, "--state-dir", str(self.engager.state_dir),
                 "--config", str(self._policy_file(n))]
        env = {**os.environ, "NOTIFY_SOCKET": ""}
        p = subprocess.Popen([*argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            time.sleep(settle_s)
            if p.poll() is not None:
                _, err = p.communicate()
                return {"n": n, "error": f"ksbpfd exited {p.returncode}: {err.strip()[-300:]}", "argv": argv}
            rss = hwm = 0
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
            return {"n": n, "rss_kb": rss, "peak_rss_kb": hwm, "argv": argv}
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self._ksctl("down")


def have_ksctl() -> bool:
    return bool(shutil.which(ksctl_argv()[0]) or Path(ksctl_argv()[0]).exists())
