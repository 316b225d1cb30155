"""The bench's own world: two network namespaces joined by a veth pair, and a cgroup
below the cgroup2 mount. Nothing here touches the host's namespace or root cgroup.

    client netns                                   server netns
    kbtun0 10.201.0.1/24  <---- veth ---->  kbsrv0 10.201.0.2/24
    kbwan0 192.0.2.1/24  <---- veth ---->  kbwan1 (no address: an "uplink" that gets
                                                    ksbpf's netdev egress chain, carries nothing)

kbtun0 plays the tunnel interface, so what is measured is the kill switch, not a VPN.
Client processes are moved into <cgroup2>/<root>/client before `ip netns exec` (which
remounts /sys and would hide the cgroup2 mount).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.linux.cgroup import remove_cgroup_tree

CLIENT_IF = "kbtun0"
SERVER_IF = "kbsrv0"
UPLINK_IF = "kbwan0"
UPLINK_PEER = "kbwan1"
CLIENT_ADDR = "10.201.0.1"
SERVER_ADDR = "10.201.0.2"
UPLINK_ADDR = "192.0.2.1"
PREFIX = 24


def sh(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    r = subprocess.run(cmd, text=True, capture_output=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


@dataclass
class Topology:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    client_ns: str = ""
    server_ns: str = ""
    cgroup_root: Path | None = None  # absolute directory
    cgroup_rel: str = ""  # relative to the cgroup2 mount, as a policy names it
    created_ns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client_ns = self.client_ns or f"ksbench-c-{self.tag}"
        self.server_ns = self.server_ns or f"ksbench-s-{self.tag}"

    @property
    def client_cgroup(self) -> Path:
        assert self.cgroup_root is not None
        return self.cgroup_root / "client"

    def exempt_cgroup_rel(self, i: int) -> str:
        return f"{self.cgroup_rel}/ex/{i}"

    def up(self) -> None:
        from ksbpf.linux.cgroup import cgroup2_mount

        for ns in (self.client_ns, self.server_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            self.created_ns.append(ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        c, s = self.client_ns, self.server_ns
        sh("ip", "link", "add", CLIENT_IF, "type", "veth", "peer", "name", SERVER_IF, "netns", s, netns=c)
        sh("ip", "addr", "add", f"{CLIENT_ADDR}/{PREFIX}", "dev", CLIENT_IF, netns=c)
        sh("ip", "addr", "add", f"{SERVER_ADDR}/{PREFIX}", "dev", SERVER_IF, netns=s)
        sh("ip", "link", "add", UPLINK_IF, "type", "veth", "peer", "name", UPLINK_PEER, "netns", s, netns=c)
        sh("ip", "addr", "add", f"{UPLINK_ADDR}/{PREFIX}", "dev", UPLINK_IF, netns=c)
        for ns, dev in ((c, CLIENT_IF), (c, UPLINK_IF), (s, SERVER_IF), (s, UPLINK_PEER)):
            sh("ip", "link", "set", dev, "up", netns=ns)
        # The uplink is the main table's default, as on a real client; kbtun0 only has its subnet.
        sh("ip", "route", "add", "default", "via", "192.0.2.254", "dev", UPLINK_IF, netns=c)
        mount = cgroup2_mount()
        self.cgroup_rel = f"ksbpf-bench-{self.tag}"
        self.cgroup_root = mount / self.cgroup_rel
        self.cgroup_root.mkdir()
        self.client_cgroup.mkdir()

    def make_exempt_cgroups(self, n: int) -> None:
        """Leaf cgroups for n exemptions, so the BPF layer's cgroup map really holds n ids."""
        assert self.cgroup_root is not None
        ex = self.cgroup_root / "ex"
        ex.mkdir(exist_ok=True)
        for i in range(n):
            (ex / str(i)).mkdir(exist_ok=True)

    def set_exempt_cgroups(self, n: int) -> None:
        """Exactly n exemption cgroups (0..n-1): control-plane times that walk the cgroup
        tree then grow with n, not with the largest n of the run."""
        assert self.cgroup_root is not None
        self.make_exempt_cgroups(n)
        for d in (self.cgroup_root / "ex").iterdir():
            if d.is_dir() and d.name.isdigit() and int(d.name) >= n:
                remove_cgroup_tree(d)

    def down(self) -> None:
        for ns in reversed(self.created_ns):
            out = subprocess.run(["ip", "netns", "pids", ns], text=True, capture_output=True).stdout
            for pid in out.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created_ns.clear()
        if self.cgroup_root is not None:
            remove_cgroup_tree(self.cgroup_root)

    def __enter__(self) -> Topology:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
