"""Per-cgroup exemptions across all three layers, driven through `ksctl` as a user would:
an exempt cgroup's socket is marked at creation (BPF), takes the physical route (ip rule),
passes nftables for exactly its grant (mark-keyed set), and passes the BPF egress check
(cgroup id, ancestor-aware). Everything else stays locked to the tunnel."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ksbpf.lab.addresses import CLIENT_V4, OUTSIDE_DNS_V4, SERVER_V4, SERVER_V6, TARGET_V4
from ksbpf.lab.lab import Lab
from ksbpf.linux.engine import state_dir_for
from tests.kernel.conftest import spawn_in
from tests.kernel.sender import send
from tests.kernel.uplink import ksctl

pytestmark = pytest.mark.kernel


class Setup:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.state = str(tmp / "state")
        self.exempt = lab.cgroup("exempt")
        self.child = lab.cgroup("exempt/child")
        self.other = lab.cgroup("other")

    def ksctl(self, *args: str) -> tuple[int, str]:
        r = ksctl(*args, netns=self.lab.client, state_dir=self.state)
        return r.returncode, r.stdout + r.stderr

    def up(self, **overrides: Any) -> None:
        cfg = self.tmp / "policy.toml"
        cfg.write_text(self.lab.policy_toml(**overrides))
        rc, out = self.ksctl("up", "--config", str(cfg))
        assert rc == 0, out


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with Lab.create() as lab:
        s = Setup(lab, tmp_path)
        try:
            yield s
        finally:
            s.ksctl("down")


def test_exempt_cgroup_reaches_exactly_its_grant_with_the_tunnel_down(setup: Setup) -> None:
    lab = setup.lab
    setup.up(exempt=[{"cgroup": lab.cgroup_rel(setup.exempt), "allow": ["tcp/443", "udp/8080"], "to": ["192.0.2.1/32"]}])
    lab.tunnel_down()
    lab.reset_counters()
    t = 0.5
    assert lab.tcp_echo(SERVER_V4, 443, cgroup=setup.exempt, timeout=2), "granted port, directly over the uplink"
    assert lab.udp_echo(SERVER_V4, 8080, cgroup=setup.exempt, timeout=2)
    assert lab.tcp_echo(SERVER_V4, 443, cgroup=setup.child, timeout=2), "descendants are covered"
    assert not lab.tcp_echo(SERVER_V4, 80, cgroup=setup.exempt, timeout=t), "other port"
    assert not lab.tcp_echo(SERVER_V6, 443, cgroup=setup.exempt, timeout=t), "other network"
    assert not lab.dns_query(OUTSIDE_DNS_V4, cgroup=setup.exempt, timeout=t), "DNS is not part of the grant"
    assert not lab.tcp_echo(SERVER_V4, 443, cgroup=setup.other, timeout=t), "other cgroup"
    assert not lab.tcp_echo(SERVER_V4, 443, timeout=t), "a process outside the BPF cgroup is still held by nft"
    flows = lab.leak_details()
    assert flows and all("→ 192.0.2.1:443" in f or "→ 192.0.2.1:8080" in f for f in flows), flows


def test_bpf_alone_holds_with_the_nftables_ruleset_and_ip_rules_gone(setup: Setup) -> None:
    """Someone flushes the whole nftables ruleset and deletes ksbpf's ip rules, then the
    tunnel device dies: main's default via the uplink is back, and only BPF stands."""
    lab = setup.lab
    setup.up(exempt=[{"cgroup": lab.cgroup_rel(setup.exempt), "allow": ["tcp/443"], "to": ["192.0.2.1/32"]}])
    lab.run(["nft", "flush", "ruleset"])
    for fam in ("-4", "-6"):
        for line in lab.run(["ip", fam, "rule", "show"]).stdout.splitlines():
            if line.endswith("proto 75"):  # ksbpf's (iproute2 here cannot filter by proto)
                lab.run(["ip", fam, "rule", "del", "pref", line.split(":")[0]])
        assert "proto 75" not in lab.run(["ip", fam, "rule", "show"]).stdout
    assert lab.run(["nft", "list", "ruleset"]).stdout.strip() == ""
    lab.tunnel_delete("kill")
    lab.reset_counters()
    t = 0.4
    for cg in (setup.other, setup.child):
        lab.udp_echo(TARGET_V4, cgroup=cg, timeout=t)
        lab.tcp_echo(SERVER_V6, 443, cgroup=cg, timeout=t)
        lab.dns_query(OUTSIDE_DNS_V4, cgroup=cg, timeout=t)
    assert not lab.tcp_echo(SERVER_V4, 80, cgroup=setup.exempt, timeout=t), "an exemption's other port"
    assert lab.leaks() == 0, lab.leak_details()
    assert lab.tcp_echo(SERVER_V4, 443, cgroup=setup.exempt, timeout=2), "the exemption's grant still works"
    # The far side does see what BPF does not judge: a process outside its cgroup leaks.
    lab.reset_counters()
    lab.udp_echo(TARGET_V4, timeout=t)
    assert lab.leaks() > 0


LISTEN = """
import socket, sys
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(); s.setblocking(False); socks.append(s)
print("ready", flush=True)
import select
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept(); c.sendall(b"hello"); c.close()
"""

def connect(netns: str, src: str, port: int) -> str:
    """A TCP connection from `src` to the client's port through the shared sender: what the
    service said ("hello"), or "fail" and why."""
    r = send(netns, CLIENT_V4, port, proto="tcp", bind=src, answer=True, timeout=0.7)
    return r.answers[0].strip() if r.answers else f"fail {', '.join(r.errors)}"


def test_exempt_inbound_service_accepts_only_its_granted_sources(setup: Setup) -> None:
    lab = setup.lab
    setup.up(exempt=[{"cgroup": lab.cgroup_rel(setup.exempt), "listen": ["tcp/2222"], "from": ["192.0.2.1/32"]}])
    lab.tunnel_down()
    servers = [
        spawn_in([sys.executable, "-c", LISTEN, "2222", "2223"], netns=lab.client, cgroup=setup.exempt, stdout=-1),
        spawn_in([sys.executable, "-c", LISTEN, "2224"], netns=lab.client, cgroup=setup.other, stdout=-1),
    ]
    try:
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == "ready"

        def from_server(src: str, port: int) -> str:
            return connect(lab.server, src, port)

        assert from_server(SERVER_V4, 2222) == "hello", "granted source reaches the exempt service"
        assert from_server(OUTSIDE_DNS_V4, 2222).startswith("fail"), "another source does not"
        assert from_server(SERVER_V4, 2223).startswith("fail"), "another port of the same service does not"
        assert from_server(SERVER_V4, 2224).startswith("fail"), "a non-exempt listener is unreachable"
    finally:
        for s in servers:
            s.kill()
            s.wait()


def test_runtime_exempt_and_unexempt_through_ksctl(setup: Setup) -> None:
    lab = setup.lab
    setup.up()
    lab.tunnel_down()
    rel = lab.cgroup_rel(setup.exempt)
    assert not lab.tcp_echo(SERVER_V4, 443, cgroup=setup.exempt, timeout=0.5)
    rc, out = setup.ksctl("exempt", "--cgroup", rel, "--allow", "tcp/443", "--to", "192.0.2.0/24")
    assert rc == 0, out
    assert lab.tcp_echo(SERVER_V4, 443, cgroup=setup.exempt, timeout=2)
    rc, out = setup.ksctl("exemptions", "--json")
    assert json.loads(out)["runtime"] == [{"cgroup": rel, "allow": ["tcp/443"], "to": ["192.0.2.0/24"]}]
    assert json.loads((state_dir_for(lab.client, Path(setup.state)) / "exemptions.json").read_text())[0]["cgroup"] == rel

    # a service restart: the cgroup is recreated with a new id; re-applying follows it
    setup.child.rmdir()
    setup.exempt.rmdir()
    setup.exempt = lab.cgroup("exempt")
    assert not lab.tcp_echo(SERVER_V4, 443, cgroup=setup.exempt, timeout=0.5), "fail closed until re-resolved"
    rc, out = setup.ksctl("exempt", "--cgroup", rel, "--allow", "tcp/443", "--to", "192.0.2.0/24")
    assert rc == 0, out
    assert lab.tcp_echo(SERVER_V4, 443, cgroup=setup.exempt, timeout=2)

    rc, out = setup.ksctl("unexempt", "--cgroup", rel)
    assert rc == 0, out
    time.sleep(0.1)
    assert not lab.tcp_echo(SERVER_V4, 443, cgroup=setup.exempt, timeout=0.5)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cgroup", "../../etc", "--allow", "tcp/22"], "'..'"),
        (["--cgroup", "a/../../b", "--allow", "tcp/22"], "'..'"),
        (["--cgroup", "x.service", "--allow", "icmp/1"], "unknown protocol"),
        (["--cgroup", "x.service", "--allow", "tcp/0"], "outside 1-65535"),
        (["--cgroup", "x.service", "--allow", "tcp/22", "--to", "10.0.0.1/8"], "host bits"),
        (["--cgroup", "x.service"], "at least one"),
        (["--cgroup", "/", "--allow", "tcp/22"], "root cgroup"),
    ],
)
def test_bad_exemptions_are_refused_and_change_nothing(setup: Setup, args: list[str], needle: str) -> None:
    setup.up()
    before = setup.ksctl("exemptions", "--json")
    rc, out = setup.ksctl("exempt", *args)
    assert rc == 2 and needle in out, out
    assert setup.ksctl("exemptions", "--json") == before


def test_a_listener_started_before_ksbpf_engaged_is_reachable(setup: Setup) -> None:
    """An sshd starts at boot alongside ksbpfd, before the sock_create program is attached:
    its listening socket has no exempt mark, so nftables and routing would drop its
    connections once ksbpf enforces (the admin locked out). ksctl marks such sockets when
    the exemption takes effect: from the policy at `up`, and at run time by `exempt`."""
    lab = setup.lab
    early = setup.lab.cgroup("early")
    servers = [
        spawn_in([sys.executable, "-c", LISTEN, "2222"], netns=lab.client, cgroup=setup.exempt, stdout=-1),
        spawn_in([sys.executable, "-c", LISTEN, "2225"], netns=lab.client, cgroup=early, stdout=-1),
        spawn_in([sys.executable, "-c", LISTEN, "2224"], netns=lab.client, cgroup=setup.other, stdout=-1),
    ]
    try:
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == "ready"
        setup.up(exempt=[{"cgroup": lab.cgroup_rel(setup.exempt), "listen": ["tcp/2222"], "from": ["192.0.2.1/32"]}])
        lab.tunnel_down()

        def from_server(port: int) -> str:
            return connect(lab.server, SERVER_V4, port)

        assert from_server(2222) == "hello", "the exempt service started before `up` is reachable"
        assert from_server(2224).startswith("fail"), "a non-exempt listener is not"
        assert from_server(2225).startswith("fail"), "nor is one not exempt yet"
        rc, out = setup.ksctl("exempt", "--cgroup", lab.cgroup_rel(early), "--listen", "tcp/2225", "--from", "192.0.2.1/32")
        assert rc == 0, out
        assert "existing sockets marked" in out, out
        assert from_server(2225) == "hello", "a running service exempted at run time is reachable at once"
        assert from_server(2224).startswith("fail")
    finally:
        for s in servers:
            s.kill()
            s.wait()
