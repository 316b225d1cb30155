"""The lab itself, on the kernel and without a kill switch: the tunnel carries traffic,
the far-side counter sees leaks when there are some (so a zero means something), the
tunnel can be broken and rebuilt, and teardown leaves nothing behind."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksbpf.lab.addresses import (
    CLIENT_V4,
    CLIENT_V6,
    DNS_OUTSIDE_A,
    DNS_TUNNEL_A,
    DNS_TUNNEL_AAAA,
    ENDPOINT_PORT,
    OUTSIDE_DNS_V4,
    ROUTED_V4,
    SERVER_V4,
    SERVER_V6,
    STATE_DIR,
    TARGET_V4,
    TARGET_V6,
    TUN_CLIENT_V4,
    TUN_CLIENT_V6,
    TUN_SERVER_V4,
    TUN_SERVER_V6,
    WG_FWMARK,
    WG_RUN_DIR,
)
from ksbpf.lab.cli import lab_down
from ksbpf.lab.demo import demo
from ksbpf.lab.lab import Lab
from ksbpf.lab.processes import LabError
from tests.kernel.conftest import unique

pytestmark = pytest.mark.kernel


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab.create() as lab:
        yield lab


def test_tunnel_carries_tcp_udp_ipv6_and_dns(lab: Lab) -> None:
    checks = lab.tunnel_checks()
    assert all(checks.values()), checks
    assert lab.udp_echo(TARGET_V6)
    assert lab.ping(TARGET_V4) and lab.ping(TARGET_V6)
    assert lab.dns_query(TUN_SERVER_V4, tcp=True).detail == DNS_TUNNEL_A
    assert lab.dns_query(TUN_SERVER_V6, qtype="AAAA").detail == DNS_TUNNEL_AAAA
    # The target saw the tunnel's addresses: the packets came through the tunnel.
    assert lab.whoami(TARGET_V4).detail == TUN_CLIENT_V4
    assert lab.whoami(TARGET_V6, proto="udp").detail == TUN_CLIENT_V6

    c = lab.counters()
    assert c.leaks == 0, c.details
    assert c.tunnel > 0


def test_counter_sees_a_leak_when_the_tunnel_is_down(lab: Lab) -> None:
    lab.tunnel_down()
    # wg-quick's routing falls through to the main table: the classic leak.
    assert not lab.udp_echo(TARGET_V4, timeout=0.3)
    assert not lab.tcp_echo(TARGET_V6, timeout=0.3)
    c = lab.counters()
    assert c.leaks >= 2
    assert any(f"udp {CLIENT_V4} → {TARGET_V4}:7" in d for d in c.details), c.details
    assert any(f"tcp {CLIENT_V6} → [{TARGET_V6}]:7" in d for d in c.details), c.details

    lab.tunnel_up()
    assert all(lab.tunnel_checks().values())
    lab.reset_counters()
    assert lab.tcp_echo() and lab.leaks() == 0


def test_counter_sees_direct_uplink_traffic(lab: Lab) -> None:
    """Everything a kill switch must stop is there to be stopped, and is counted."""
    assert lab.dns_query(OUTSIDE_DNS_V4).detail == DNS_OUTSIDE_A
    assert lab.dns_query(SERVER_V4).detail == DNS_OUTSIDE_A
    assert lab.tcp_echo(SERVER_V4, 443)
    assert lab.udp_echo(SERVER_V6, 22)
    # Plaintext to the endpoint port, with and without the tunnel's mark.
    lab.udp_echo(SERVER_V4, ENDPOINT_PORT, timeout=0.2)
    lab.udp_echo(SERVER_V4, ENDPOINT_PORT, timeout=0.2, mark=WG_FWMARK)
    # A socket bound to the uplink, bypassing routing; raw frames, bypassing the IP stack.
    lab.udp_echo(TARGET_V4, device="uplink", timeout=0.2)
    assert lab.raw_frames(TARGET_V4, 9, count=3)
    c = lab.counters()
    details = "\n".join(c.details)
    for flow in (f"{OUTSIDE_DNS_V4}:53", f"{SERVER_V4}:53", f"{SERVER_V4}:443", f"[{SERVER_V6}]:22",
                 f"udp {CLIENT_V4} → {SERVER_V4}:{ENDPOINT_PORT} ×2", f"{TARGET_V4}:7",
                 f"udp {CLIENT_V4} → {TARGET_V4}:9 ×3"):
        assert flow in details, details


def test_tunnel_endpoint_is_unreachable_from_outside_the_tunnel(lab: Lab) -> None:
    """The target and the tunnel resolver answer only through the tunnel, so a reply
    from them proves the tunnel path."""
    assert not lab.udp_echo(TARGET_V4, device="uplink", timeout=0.3)
    assert not lab.dns_query(TUN_SERVER_V4, device="uplink", timeout=0.3)


def test_tunnel_recreate_gives_a_new_ifindex(lab: Lab) -> None:
    first = lab.tunnel_ifindex()
    assert first is not None
    lab.tunnel_delete()
    assert lab.tunnel_ifindex() is None
    assert not (WG_RUN_DIR / f"{lab.wg}.sock").exists()
    second = lab.tunnel_recreate()
    assert second != first
    assert all(lab.tunnel_checks().values())

    lab.tunnel_delete(how="kill")
    assert lab.tunnel_ifindex() is None
    third = lab.tunnel_up()
    assert third not in (first, second)
    assert all(lab.tunnel_checks().values())


def test_traffic_while_the_tunnel_dies_leaks_without_a_kill_switch(lab: Lab) -> None:
    with lab.traffic() as traffic:
        time.sleep(0.3)
        lab.tunnel_delete()
        time.sleep(0.4)
        stats = traffic.stop()
    assert stats.sent > 50 and stats.received > 0
    c = lab.counters()
    assert c.tunnel > 0
    assert any(f"{CLIENT_V4} → {TARGET_V4}:7" in d for d in c.details), c.details
    assert any(f"{CLIENT_V4} → {TUN_SERVER_V4}:53" in d for d in c.details), c.details


def test_pushed_route_pulls_traffic_out_of_the_tunnel(lab: Lab) -> None:
    """TunnelVision against plain wg-quick routing: suppress_prefixlength 0 lets the
    pushed /32 win over the tunnel."""
    lab.push_route(f"{TARGET_V4}/32")
    assert not lab.tcp_echo(TARGET_V4, timeout=0.3)
    assert any(f"tcp {CLIENT_V4} → {TARGET_V4}:7" in d for d in lab.leak_details())
    lab.remove_route(f"{TARGET_V4}/32")
    assert lab.tcp_echo(TARGET_V4)


def test_routed_host_goes_through_the_tunnel_and_leaks_when_it_is_down(lab: Lab) -> None:
    routed = lab.add_routed_host()
    assert lab.add_routed_host() == routed
    assert all(lab.tunnel_checks(netns=routed).values())
    assert lab.whoami(netns=routed).detail == ROUTED_V4
    assert lab.leaks() == 0
    lab.tunnel_down()
    assert not lab.udp_echo(netns=routed, timeout=0.3)
    assert any(f"udp {ROUTED_V4} → {TARGET_V4}:7" in d for d in lab.leak_details())


def test_probes_run_in_the_given_cgroup(lab: Lab) -> None:
    apps = lab.cgroup("apps")
    rel = lab.cgroup_rel(apps)
    cp = lab.run(["cat", "/proc/self/cgroup"], cgroup=apps)
    assert f"0::/{rel}\n" in cp.stdout
    assert lab.tcp_echo(cgroup=apps) and lab.dns_query(cgroup=rel)
    assert lab.cgroup_rel(lab.wg_cgroup) == f"{lab.cgroup_rel()}/wireguard"
    with pytest.raises(LabError):
        lab.cgroup("../escape")


def test_policy_is_valid_and_names_the_lab(lab: Lab) -> None:
    from ksbpf.policy import loads_policy

    p = loads_policy(lab.policy_toml())
    assert p.tunnel.interfaces == (lab.wg,)
    assert str(p.tunnel.endpoints[0]) == f"{SERVER_V4}:{ENDPOINT_PORT}/udp"
    assert p.tunnel.endpoint_mark == WG_FWMARK
    assert [str(s) for s in p.dns.servers] == [TUN_SERVER_V4]
    assert p.bpf.cgroup == lab.cgroup_rel() and p.bpf.cgroup != "/"
    p2 = loads_policy(lab.policy_toml(ipv6={"mode": "block"}, lan={"allow": True, "networks": ["192.0.2.0/24"]},
                                      exempt=[{"cgroup": lab.cgroup_rel(lab.cgroup("ntp")), "allow": ["udp/123"]}]))
    assert p2.ipv6.mode == "block" and p2.lan.allow and len(p2.exemptions) == 1


def _leftovers(lab: Lab, pids: list[int]) -> list[str]:
    out = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out += [line for line in namespaces.splitlines() if line.startswith(f"{lab.name}-")]
    out += [f"pid {p}" for p in pids if Path(f"/proc/{p}").exists()
            and Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()[0] != "Z"]
    out += [str(p) for p in WG_RUN_DIR.glob("*") if p.stem in (lab.wg, lab.wg_server)] if WG_RUN_DIR.exists() else []
    out += [str(p) for p in (lab.cgroup_root, lab.state_dir, Lab.state_file(lab.name)) if p and p.exists()]
    return out


def test_close_leaves_nothing_behind() -> None:
    lab = Lab.create(routed=True)
    try:
        traffic = lab.traffic()  # left running on purpose
        listener = subprocess.Popen(["ip", "netns", "exec", lab.target, "sleep", "60"])
        in_cgroup = lab.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], cgroup=lab.cgroup("apps"))
        pids = [*lab.processes().values(), traffic.popen.pid, listener.pid, int(in_cgroup.stdout)]
        assert len(pids) >= 6
    finally:
        lab.close()
    listener.wait(timeout=5)
    traffic.popen.wait(timeout=5)
    assert _leftovers(lab, pids) == []
    lab.close()  # idempotent


def test_failed_create_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Lab) -> None:
        raise LabError("injected")

    monkeypatch.setattr(Lab, "_warm_up", broken)
    name = unique("klf")
    with pytest.raises(LabError, match="injected"):
        Lab.create(name)
    assert not Lab.state_file(name).exists()
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(name)]


def test_up_and_down_from_separate_processes() -> None:
    name = unique("klp")
    code = f"from ksbpf.lab.cli import lab_up; print(lab_up({name!r}, routed=True))"
    try:
        cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parents[2], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        assert cp.returncode == 0, cp.stderr
        assert f"ip netns exec {name}-client" in cp.stdout
        assert (STATE_DIR / name / "policy.toml").exists()
        lab = Lab.load(name)
        assert lab.routed == f"{name}-routed"
        assert all(lab.tunnel_checks().values())
        with pytest.raises(LabError, match="exists already"):
            Lab.create(name)
        pids = list(lab.processes().values())
    finally:
        downed = lab_down(name)
    assert downed is True
    assert _leftovers(lab, pids) == []
    assert lab_down(name) is False


def test_demo_passes_and_cleans_up() -> None:
    pytest.importorskip("ksbpf.linux.engine")
    name = unique("kld")
    out = io.StringIO()
    rc = demo(out, name=name)
    text = out.getvalue()
    assert rc == 0, text
    assert "\nPASS: " in text and ": 0 leaked" in text, text
    assert len(text.splitlines()) <= 10
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in namespaces
    assert not Lab.state_file(name).exists()
