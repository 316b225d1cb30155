"""The generated boot lockdown on the kernel: real nft checks and loads it in namespaces
this test makes; packets over a veth pair between two of them show that the admin's
port answers from its allowed sources and nothing else gets in or out; `ksctl up` and
ksbpfd write it on every apply."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksbpf.policy import loads_policy
from ksbpf.render.lockdown import render_lockdown
from tests.kernel.conftest import NetnsFactory, sh
from tests.kernel.sender import send
from tests.kernel.test_daemon import DaemonFactory, World, wait_for
from tests.kernel.test_daemon import daemon as daemon  # the fixtures, re-exported for pytest
from tests.kernel.test_daemon import world as world
from tests.kernel.uplink import LOCKDOWN, build_uplink, ksctl, watch_count

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
BASE = """
[tunnel]
interfaces = ["wg0"]
endpoints = ["198.51.100.7:51820/udp"]
endpoint_mark = 0xca6c
"""
# The admin may reach ssh (tcp/22) and a udp service from 10.9.0.2 and fd09::2 only.
ADMIN = BASE + """
[[exempt]]
cgroup = "system.slice/ssh.service"
listen = ["tcp/22", "udp/6000"]
from = ["10.9.0.2/32", "fd09::2/128"]
[[exempt]]
cgroup = "system.slice/systemd-timesyncd.service"
allow = ["udp/123"]
"""

SERVE = r"""
import socket, sys, threading
def tcp(fam, addr, port):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(16)
    def loop():
        while True:
            c, _ = s.accept()
            c.sendall(b"hi %d" % port); c.close()
    threading.Thread(target=loop, daemon=True).start()
def udp(fam, addr, port):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    def loop():
        while True:
            data, peer = s.recvfrom(100)
            s.sendto(b"hi %d" % port, peer)
    threading.Thread(target=loop, daemon=True).start()
for port in map(int, sys.argv[1].split(",")):
    tcp(socket.AF_INET, "0.0.0.0", port); tcp(socket.AF_INET6, "::", port)
for port in map(int, sys.argv[2].split(",")):
    udp(socket.AF_INET, "0.0.0.0", port); udp(socket.AF_INET6, "::", port)
print("ready", flush=True)
threading.Event().wait()
"""

def nft_check(netns: str, path: Path) -> subprocess.CompletedProcess[str]:
    return sh("nft", "-c", "-f", str(path), netns=netns, check=False)


def probe(netns: str, proto: str, dst: str, port: int, src: str = "-") -> str:
    """One TCP connection or UDP datagram (from `src`) through the shared sender: what came
    back, or "no answer: why"."""
    r = send(netns, dst, port, proto=proto, bind=None if src == "-" else src, payload="?", answer=True, timeout=1.5)
    return r.answers[0].strip() if r.answers else f"no answer: {', '.join(r.errors)}"


def seen(netns: str) -> int:
    return watch_count(netns)


@pytest.fixture
def pair(make_netns: NetnsFactory) -> Iterator[tuple[str, str]]:
    """server (where the lockdown goes) and client, a veth between them; the client has an
    allowed address (10.9.0.2, fd09::2) and one that is not (10.9.0.3, fd09::3). Servers
    listen on both sides (tcp 22, 23; udp 6000, 6001)."""
    u = build_uplink(make_netns, tunnel=False, plan=LOCKDOWN)  # what arrives at the admin is counted
    server, client = u.client, u.far
    procs = []
    try:
        for ns in (server, client):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVE, "22,23", "6000,6001"],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield server, client
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def test_nft_accepts_every_rendering(make_netns: NetnsFactory, tmp_path: Path) -> None:
    ns = make_netns("klk")
    many = BASE + "".join(
        f'[[exempt]]\ncgroup = "s{i}.service"\nlisten = ["tcp/{1000 + i}", "udp/{2000 + i}-{2010 + i}"]\n'
        + (f'from = ["10.{i}.0.0/16", "2001:db8:{i:x}::/48"]\n' if i % 2 else "")
        for i in range(50))
    for name, policy in (("none", None), ("base", loads_policy(BASE)), ("admin", loads_policy(ADMIN)),
                         ("many", loads_policy(many))):
        path = tmp_path / f"{name}.nft"
        path.write_text(render_lockdown(policy))
        r = nft_check(ns, path)
        assert r.returncode == 0, f"{name}: {r.stderr}"
    # A minimal Debian has no /etc/protocols (netbase): the file must not need it. Hidden
    # in a mount namespace of the check's own; the old "ipv6-icmp" fails here.
    path = tmp_path / "admin.nft"
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind /dev/null /etc/protocols && exec "$@"', "-",
                        "ip", "netns", "exec", ns, "nft", "-c", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"needs /etc/protocols: {r.stderr}"
    path.write_text(render_lockdown(loads_policy(ADMIN)).replace("icmpv6 }", "ipv6-icmp }"))
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind /dev/null /etc/protocols && exec "$@"', "-",
                        "ip", "netns", "exec", ns, "nft", "-c", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode != 0, "the /etc/protocols check cannot fail"
    # the check can fail: a broken file is refused
    bad = tmp_path / "bad.nft"
    bad.write_text(render_lockdown(loads_policy(ADMIN)).replace("tcp dport", "tcp dprt"))
    assert nft_check(ns, bad).returncode != 0


def test_admin_port_answers_from_allowed_sources_only_and_nothing_new_leaves(pair: tuple[str, str], tmp_path: Path) -> None:
    server, client = pair
    # without the lockdown everything answers: each probe below can fail
    assert probe(client, "tcp", "10.9.0.1", 23, "10.9.0.3") == "hi 23"
    assert probe(client, "udp", "fd09::1", 6001, "fd09::3") == "hi 6001"
    assert probe(server, "tcp", "10.9.0.2", 22) == "hi 22"

    path = tmp_path / "lockdown.nft"
    path.write_text(render_lockdown(loads_policy(ADMIN)))
    sh("nft", "-f", str(path), netns=server)
    sh("nft", "-f", str(path), netns=server)  # add-then-delete: loading it again replaces it
    assert sh("nft", "list", "tables", netns=server).stdout.count("ksbpf_lockdown") == 1

    # nothing new goes out of the server, not even to the admin's address
    before = seen(client)
    for proto, dst, port in (("tcp", "10.9.0.2", 22), ("udp", "10.9.0.2", 6000), ("tcp", "fd09::2", 22)):
        assert probe(server, proto, dst, port).startswith("no answer"), (proto, dst, port)
    assert seen(client) == before, "a new outbound packet left the locked-down namespace"

    # the admin's port answers from its allowed source, over IPv4 and IPv6, tcp and udp
    assert probe(client, "tcp", "10.9.0.1", 22, "10.9.0.2") == "hi 22"
    assert probe(client, "tcp", "fd09::1", 22, "fd09::2") == "hi 22"
    assert probe(client, "udp", "10.9.0.1", 6000, "10.9.0.2") == "hi 6000"
    assert probe(client, "udp", "fd09::1", 6000, "fd09::2") == "hi 6000"
    # ... and nothing else: another port from the allowed source, the port from another source
    for proto, dst, port, src in (("tcp", "10.9.0.1", 23, "10.9.0.2"), ("tcp", "10.9.0.1", 22, "10.9.0.3"),
                                  ("tcp", "fd09::1", 22, "fd09::3"), ("udp", "10.9.0.1", 6001, "10.9.0.2"),
                                  ("udp", "10.9.0.1", 6000, "10.9.0.3")):
        assert probe(client, proto, dst, port, src).startswith("no answer"), (proto, dst, port, src)

    # the console rescue in the README lifts it
    sh("nft", "delete", "table", "inet", "ksbpf_lockdown", netns=server)
    assert probe(client, "tcp", "10.9.0.1", 23, "10.9.0.3") == "hi 23"


def test_the_static_shaped_lockdown_blocks_everything(pair: tuple[str, str], tmp_path: Path) -> None:
    server, client = pair
    path = tmp_path / "lockdown.nft"
    path.write_text(render_lockdown(loads_policy(BASE)))
    sh("nft", "-f", str(path), netns=server)
    assert probe(client, "tcp", "10.9.0.1", 22, "10.9.0.2").startswith("no answer")
    assert probe(server, "tcp", "127.0.0.1", 22) == "hi 22"  # loopback stays


def test_ksctl_up_writes_the_lockdown_and_check_can_too(make_netns: NetnsFactory, tmp_path: Path) -> None:
    ns = make_netns("klu")
    state = tmp_path / "state"
    policy = tmp_path / "policy.toml"
    policy.write_text(ADMIN)
    policy.chmod(0o600)
    written = state / "netns" / ns / "lockdown.nft"
    try:
        # --no-bpf: the policy's [bpf] cgroup is the root one, which no test may attach to
        r = ksctl("up", "--config", str(policy), "--no-bpf", netns=ns, state_dir=str(state))
        assert r.returncode in (0, 3), r.stdout + r.stderr
        assert written.read_text() == render_lockdown(loads_policy(ADMIN, str(policy)))
        assert written.stat().st_mode & 0o777 == 0o600
        policy.write_text(BASE)
        r = ksctl("up", "--config", str(policy), "--no-bpf", netns=ns, state_dir=str(state))
        assert r.returncode in (0, 3), r.stdout + r.stderr
        assert "dport" not in written.read_text()
    finally:
        ksctl("down", netns=ns, state_dir=str(state))
    written.unlink()
    policy.write_text(ADMIN)
    r = ksctl("check", "--config", str(policy), "--write-lockdown", netns=ns, state_dir=str(state))
    assert r.returncode == 0, r.stderr
    assert "tcp dport { 22 }" in written.read_text()
    assert nft_check(ns, written).returncode == 0


def test_ksbpfd_writes_the_lockdown_at_start_and_reload(world: World, daemon: DaemonFactory) -> None:
    extra = '[[exempt]]\ncgroup = "system.slice/ssh.service"\nlisten = ["tcp/22"]\nfrom = ["10.9.0.0/24"]\n'
    d = daemon(world.policy(extra), "--no-bpf")
    written = world.state / "netns" / world.client / "lockdown.nft"
    assert "ip saddr { 10.9.0.0/24 } tcp dport { 22 }" in written.read_text()
    assert "boot lockdown written to" in d.log_text()
    world.write_policy(world.policy(extra.replace("tcp/22", "tcp/2222")))
    d.signal(signal.SIGHUP)
    wait_for(lambda: "tcp dport { 2222 }" in written.read_text(), "the reload to rewrite the lockdown")
    assert nft_check(world.client, written).returncode == 0
