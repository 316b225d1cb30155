"""ksbpfd against a real WireGuard tunnel (wireguard-go, ksbpf.lab): the tunnel recreated
by its client under traffic resumes through the daemon alone, and killing the daemon
with -9 under traffic leaks nothing. Leaks are counted on the server's side of the
uplink, where they would be seen."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ksbpf.lab.addresses import TARGET_V4, TARGET_V6
from ksbpf.lab.lab import Lab
from ksbpf.lab.processes import LabError
from ksbpf.linux.engine import LinuxEngine, state_dir_for
from tests.kernel.test_daemon import DaemonFactory, sample, wait_for
from tests.kernel.uplink import ksctl

pytestmark = pytest.mark.kernel


class LabWorld:
    """What DaemonFactory needs, for a lab's client namespace."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.client = lab.client
        self.port = lab.metrics_port
        self.tmp = tmp
        self.state = tmp / "state"
        self.policy_path = tmp / "policy.toml"
        self.apps = lab.cgroup("apps")

    def policy(self, **overrides: Any) -> str:
        return self.lab.policy_toml(**overrides)

    def write_policy(self, text: str, mode: int = 0o600) -> Path:
        tmp = self.policy_path.with_suffix(".new")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, self.policy_path)
        return self.policy_path

    def ksctl(self, *args: str) -> Any:
        return ksctl(*args, netns=self.client, state_dir=str(self.state))

    def engine(self) -> LinuxEngine:
        return LinuxEngine(netns=self.client, state_dir=state_dir_for(self.client, self.state))


@contextlib.contextmanager
def lab_for_test() -> Iterator[Lab]:
    """A lab, closed even when its first teardown attempt finds the kernel still busy
    (a killed wireguard-go can take seconds to exit while its namespace is destroyed)."""
    lab = Lab.create()
    try:
        yield lab
    finally:
        for attempt in range(6):
            try:
                lab.close()
                break
            except LabError:
                if attempt == 5:
                    raise
                time.sleep(1.0)


@pytest.fixture
def lab_world(tmp_path: Path) -> Iterator[LabWorld]:
    with lab_for_test() as lab:
        yield LabWorld(lab, tmp_path)


@pytest.fixture
def lab_daemon(lab_world: LabWorld) -> Iterator[DaemonFactory]:
    f = DaemonFactory(lab_world)  # type: ignore[arg-type]
    try:
        yield f
    finally:
        f.cleanup()


def _through_tunnel(w: LabWorld) -> bool:
    return bool(w.lab.udp_echo(TARGET_V4, cgroup=w.apps, timeout=0.3))


def test_tunnel_recreated_under_traffic_resumes_through_the_daemon(
    lab_world: LabWorld, lab_daemon: DaemonFactory, record_property: Callable[[str, object], None]
) -> None:
    w, lab = lab_world, lab_world.lab
    d = lab_daemon()
    assert _through_tunnel(w)
    old = lab.tunnel_ifindex()
    lab.reset_counters()
    with lab.traffic(interval=0.005, cgroup=w.apps) as flows:
        time.sleep(0.3)
        new = lab.tunnel_recreate()  # wireguard-go restarted: new device, new ifindex, configured
        back = time.monotonic()
        wait_for(lambda: _through_tunnel(w), "traffic through the recreated tunnel", timeout=30, interval=0.01)
        resumed_ms = (time.monotonic() - back) * 1000
        time.sleep(0.3)
        stats = flows.stop()
    assert new != old
    assert lab.leaks() == 0, lab.leak_details()
    assert stats.sent > 0 and stats.received > 0
    status = d.status()
    assert status["tunnels"] == {lab.wg: True}
    follow = status["last_tunnel_follow_ms"]
    record_property("tunnel_follow_ms_daemon", follow)
    record_property("tunnel_resumed_ms_probe", round(resumed_ms, 1))
    print(f"tunnel recreated (ifindex {old} -> {new}): daemon followed in {follow} ms; "
          f"a probe got through {resumed_ms:.0f} ms after the new device was configured")
    assert follow is not None and follow < 500, "goal 100 ms; checked generously on a shared 2-core VM"
    assert all(lab.tunnel_checks(cgroup=w.apps).values())
    assert lab.udp_echo(TARGET_V6, cgroup=w.apps)
    m = d.scrape()
    assert sum(v for k, v in m.items() if k[0] == "ksbpf_drift_repairs_total") == 0
    assert sample(m, "ksbpf_tunnel_up", interface=lab.wg) == 1


def test_kill_9_under_traffic_leaks_nothing_and_a_new_daemon_takes_over(lab_world: LabWorld, lab_daemon: DaemonFactory) -> None:
    w, lab = lab_world, lab_world.lab
    d = lab_daemon()
    lab.reset_counters()
    with lab.traffic(interval=0.005, cgroup=w.apps) as flows:
        time.sleep(0.3)
        d.proc.kill()  # kill -9, by pid
        d.proc.wait()
        time.sleep(0.3)
        lab.tunnel_delete(how="kill")  # and the VPN client crashes too, with nobody watching
        time.sleep(0.5)
        lab.tunnel_recreate()  # it comes back with a new ifindex: no route yet, blocked
        time.sleep(0.5)
        stats = flows.stop()
    assert stats.sent > 0
    assert lab.leaks() == 0, lab.leak_details()
    assert not _through_tunnel(w), "without a daemon the recreated tunnel stays blocked until re-engaged"
    assert lab.leaks() == 0

    d2 = lab_daemon()  # the service manager restarts it
    wait_for(lambda: _through_tunnel(w), "the new daemon to route the recreated tunnel", timeout=30)
    st = d2.status()
    assert st["pid"] == d2.proc.pid and st["enforcing"] is True
    assert all(s["engaged"] for s in st["layers"].values() if s) or st["layers"]["bpf"]["engaged"] is False
    assert lab.leaks() == 0, lab.leak_details()
    assert json.loads(json.dumps(st["tunnels"])) == {lab.wg: True}
