"""Lab: the topology, its probes and counters, and its teardown in one object. Build with
`Lab.create()` (or `ksctl lab up`), find again with `Lab.load(name)`, tear down with
`close()`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

from ksbpf.lab.addresses import (
    ECHO_PORT,
    ENDPOINT,
    OUTSIDE_DNS_V4,
    STATE_DIR,
    TARGET_V4,
    TARGET_V6,
    TUN_CLIENT_V4,
    TUN_CLIENT_V6,
    TUN_SERVER_V4,
    UPLINK,
    WG_FWMARK,
    WG_RUN_DIR,
    WHOAMI_PORT,
)
from ksbpf.lab.processes import LabError, free_port, protected_pids, run_cmd
from ksbpf.lab.rulesets import merge_policy, render_toml
from ksbpf.lab.topology import LabTopology
from ksbpf.lab.traffic import LabTraffic
from ksbpf.linux.cgroup import remove_cgroup_tree

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")


class Lab(LabTopology, LabTraffic):
    """Build with `Lab.create()` (or `ksbpf.lab.cli.lab_up()`), find again with `Lab.load(name)`,
    tear down with `close()` (idempotent; also the context manager's exit)."""

    @classmethod
    def create(cls, name: str | None = None, *, routed: bool = False) -> Lab:
        name = name or f"kl{secrets.token_hex(3)}"
        if not _NAME_RE.match(name):
            raise LabError(f"lab name {name!r}: use 1-20 of a-z 0-9 -, starting with a letter or digit")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, nftables, wireguard-go)")
        for tool in ("ip", "nft", "wg", "wireguard-go", "sysctl"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is not installed (see `make setup`)")
        STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cls.state_file(name).exists():
            raise LabError(f"lab {name!r} exists already; `ksctl lab down {name}` removes it")
        existing = set(run_cmd(["ip", "netns", "list"]).stdout.split())
        tok = secrets.token_hex(3)
        state: dict[str, Any] = {
            "name": name,
            "client": f"{name}-client",
            "server": f"{name}-server",
            "target": f"{name}-target",
            "routed": None,
            # wireguard-go's control sockets are shared by every namespace: names are unique.
            "wg": f"wgc{tok}",
            "wg_server": f"wgs{tok}",
            "state_dir": str(STATE_DIR / name),
            "cgroup_root": None,
            "metrics_port": free_port(),
            "procs": [],
            "namespaces": [],
        }
        clash = {state["client"], state["server"], state["target"]} & existing
        if clash:
            raise LabError(f"network namespace {sorted(clash)[0]} exists already; pick another lab name")
        lab = cls(state)
        try:
            # Claims the name atomically: close() below must never tear down another's lab.
            lab.state_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise LabError(f"lab {name!r} exists already; `ksctl lab down {name}` removes it") from None
        try:
            lab._save()
            lab._build()
            if routed:
                lab.add_routed_host()
            lab._save()
        except BaseException:
            lab.close()
            raise
        return lab

    @classmethod
    def load(cls, name: str) -> Lab:
        try:
            state = json.loads(cls.state_file(name).read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} (no {cls.state_file(name)})") from None
        except (OSError, ValueError) as e:
            raise LabError(f"{cls.state_file(name)}: {e}") from None
        return cls(state)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self._build_topology()
        self._warm_up()
        self.reset_counters()

    # ----------------------------------------------------------------- policy

    def policy_data(self, *, bpf_cgroup: Path | str | None = None, **overrides: Any) -> dict[str, Any]:
        if bpf_cgroup is None:
            bpf_rel = self.cgroup_rel()
        elif isinstance(bpf_cgroup, Path):
            bpf_rel = self.cgroup_rel(bpf_cgroup)
        else:
            bpf_rel = bpf_cgroup
        base = {
            "tunnel": {"interfaces": [self.wg], "endpoints": [ENDPOINT], "endpoint_mark": WG_FWMARK},
            "dns": {"servers": [TUN_SERVER_V4]},
            "ipv6": {"mode": "tunnel"},
            "bpf": {"cgroup": bpf_rel},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        return merge_policy(base, overrides)

    def policy_toml(self, *, bpf_cgroup: Path | str | None = None, **overrides: Any) -> str:
        """The client's policy: tunnel = this lab's wg device and endpoint with the endpoint
        mark, the tunnel's resolver, IPv6 via the tunnel, BPF on the lab's cgroup (or
        `bpf_cgroup`: a Path, or a path relative to the cgroup2 mount). Overrides are per
        table: policy_toml(ipv6={"mode": "block"}, exempt=[{...}], lan=None)."""
        return render_toml(self.policy_data(bpf_cgroup=bpf_cgroup, **overrides))

    def describe(self) -> str:
        return "\n".join([
            f"lab {self.name}: {self.client} ⇄ {UPLINK} ⇄ {self.server} ⇄ {self.target}"
            + (f", {self.routed} routed via the client" if self.routed else ""),
            f"  tunnel {self.wg} (client {TUN_CLIENT_V4}, {TUN_CLIENT_V6}) → endpoint {ENDPOINT}, fwmark {WG_FWMARK:#x}",
            f"  target {TARGET_V4} / {TARGET_V6}: tcp+udp echo on {ECHO_PORT}, whoami on {WHOAMI_PORT}",
            f"  resolvers: {TUN_SERVER_V4} in the tunnel, {OUTSIDE_DNS_V4} outside it",
            f"  shell: ip netns exec {self.client} bash",
            f"  policy: {self.state_dir / 'policy.toml'}",
        ])

    # ----------------------------------------------------------------- teardown

    def close(self) -> None:
        """Remove everything the lab made: processes (by pid), namespaces, wireguard-go
        sockets, cgroups, state. Idempotent. Raises LabError naming what it could not
        remove, and then keeps the state so that `lab_down(name)` can try again."""
        if self.closed:
            return
        problems: list[str] = []
        for proc in list(self._procs):
            try:
                self._stop(proc, grace=1.0)
            except OSError as e:
                problems.append(f"{proc.role} (pid {proc.pid}): {e}")
        protected = protected_pids()
        for ns in reversed(list(self._namespaces)):
            # Whatever else runs in the lab's namespaces was started into them (a test's
            # listener, a probe): end it, then the namespace.
            out = run_cmd(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in (int(p) for p in out if p.isdigit()):
                if pid not in protected:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            cp = run_cmd(["ip", "netns", "del", ns], check=False)
            if cp.returncode != 0 and Path("/run/netns", ns).exists():
                problems.append(f"netns {ns}: {cp.stderr.strip()}")
            else:
                self._namespaces.remove(ns)
        for ifname in (self.wg, self.wg_server):
            with contextlib.suppress(FileNotFoundError):
                (WG_RUN_DIR / f"{ifname}.sock").unlink()
        if self.cgroup_root is not None:
            left = remove_cgroup_tree(self.cgroup_root, protected)
            problems += left
            if not left:
                self.cgroup_root = None
        if problems:
            self._save()
            raise LabError(f"lab {self.name}: could not remove " + "; ".join(problems))
        self.closed = True
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_file(self.name).unlink()
