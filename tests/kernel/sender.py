"""The kernel tests' one packet sender: UDP datagrams or TCP connections from a network
namespace and cgroup the test made, with the socket options the tests need (a device, a
mark, a source address or port, a command name), reporting per probe what the kernel
accepted, what it refused (by errno) and what came back.

One interpreter runs every probe of a call, in order, each on its own socket (closed
before the next, so a fixed source port can be bound again). The cgroup is joined before
the namespace is entered (run_in), so the socket is created in it: that is when the BPF
layer tags it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.kernel.conftest import run_in

SCRIPT = r"""
import ctypes, errno, json, socket, sys
req = json.load(sys.stdin)
if req["comm"]:
    ctypes.CDLL(None).prctl(15, req["comm"].encode(), 0, 0, 0)  # PR_SET_NAME, before any socket
out = []

def error(res, e):
    key = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    res["errors"][key] = res["errors"].get(key, 0) + 1

def make(p, fam, kind):
    s = socket.socket(fam, kind)
    if p["dev"]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, p["dev"].encode())
    if p["mark"]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, p["mark"])
    if p["sport"] or p["bind"]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((p["bind"] or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), p["sport"]))
    if p["timeout"]:
        s.settimeout(p["timeout"])
    return s

for p in req["probes"]:
    fam = socket.AF_INET6 if ":" in p["dst"] else socket.AF_INET
    payload = p["payload"].encode()
    res = {"sent": 0, "errors": {}, "mark": 0, "answers": []}
    if p["proto"] == "udp":
        s = make(p, fam, socket.SOCK_DGRAM)
        res["mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        for _ in range(p["n"]):
            try:
                s.sendto(payload, (p["dst"], p["port"]))
                res["sent"] += 1
                if p["answer"]:
                    res["answers"].append(s.recv(100).decode())
            except OSError as e:
                error(res, e)
        s.close()
    else:
        for _ in range(p["n"]):
            s = make(p, fam, socket.SOCK_STREAM)
            res["mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
            try:
                s.connect((p["dst"], p["port"]))
                res["sent"] += 1
                if p["answer"]:
                    res["answers"].append(s.recv(100).decode())
            except OSError as e:
                error(res, e)
            s.close()
    out.append(res)
print(json.dumps({"pid": __import__("os").getpid(), "probes": out}))
"""


@dataclass(frozen=True)
class Probe:
    """`n` UDP datagrams (one socket) or `n` TCP connections (one socket each) to dst:port.
    answer: wait up to `timeout` for what comes back after each (the first 100 bytes)."""

    dst: str
    port: int
    n: int = 1
    proto: str = "udp"
    dev: str | None = None
    mark: int = 0
    sport: int = 0
    bind: str | None = None
    payload: str = "k" * 32
    answer: bool = False
    timeout: float = 0.0


@dataclass(frozen=True)
class Sent:
    """sent: datagrams the kernel accepted (TCP: connections made); errors: errno name (or
    exception name, e.g. TimeoutError) -> count; mark: the socket's mark once made and
    its options set; answers: what came back, in order."""

    sent: int
    errors: dict[str, int] = field(default_factory=dict)
    mark: int = 0
    answers: list[str] = field(default_factory=list)

    @property
    def eperm(self) -> int:
        return self.errors.get("EPERM", 0)


@dataclass(frozen=True)
class Sending:
    pid: int
    results: list[Sent]


def send_all(netns: str, probes: list[Probe], *, cgroup: Path | None = None, comm: str | None = None,
             timeout: float = 60) -> Sending:
    """Every probe from one process in `netns` (and `cgroup`); comm names that process."""
    req = {"comm": comm, "probes": [asdict(p) for p in probes]}
    r = run_in([sys.executable, "-c", SCRIPT], netns=netns, cgroup=cgroup, input=json.dumps(req), timeout=timeout)
    assert r.returncode == 0, f"sender failed in {netns}: {r.stderr.strip()[-500:]}"
    doc = json.loads(r.stdout)
    return Sending(int(doc["pid"]), [Sent(**res) for res in doc["probes"]])


def send(netns: str, dst: str, port: int, n: int = 1, *, cgroup: Path | None = None, **opts: object) -> Sent:
    """One probe (see Probe for opts: proto, dev, mark, sport, bind, payload, answer, timeout)."""
    return send_all(netns, [Probe(dst, port, n, **opts)], cgroup=cgroup).results[0]  # type: ignore[arg-type]


def send_udp(netns: str, dst: str, port: int, n: int) -> int:
    """n UDP datagrams from `netns`; how many the kernel accepted."""
    return send(netns, dst, port, n, payload="x" * 32).sent
