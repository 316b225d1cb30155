"""The kernel tests' one packet sender: UDP datagrams, TCP connections or ICMP messages from
a network namespace and cgroup the test made, with the socket options the tests need (a
device, a mark, a source address or port, a command name), reporting per probe what the kernel
accepted, what it refused (by errno) and what came back.

One interpreter runs every probe of a call, in order, each on its own socket (closed
before the next, so a fixed source port can be bound again). The cgroup is joined before
the namespace is entered (run_in), so the socket is created in it: that is when the BPF
layer tags it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.kernel.conftest import run_in, spawn_in

SCRIPT = r"""
import ctypes, errno, json, os, socket, sys
req = json.load(sys.stdin)
if req["comm"]:
    ctypes.CDLL(None).prctl(15, req["comm"].encode(), 0, 0, 0)  # PR_SET_NAME, before any socket
out = []

def error(res, e):
    key = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    res["errors"][key] = res["errors"].get(key, 0) + 1

def make(p, fam, kind, proto=0):
    s = socket.socket(fam, kind, proto)
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
    elif p["proto"] == "icmp":
        v6 = fam == socket.AF_INET6
        s = make(p, fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        res["mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        # type, code, checksum (the kernel fills it in for ICMPv6; 0 will do on IPv4 here)
        msg = bytes([p["icmp_type"], 0, 0, 0]) + bytes(4) + (socket.inet_pton(fam, p["dst"]) if v6 else b"")
        for _ in range(p["n"]):
            try:
                s.sendto(msg, (p["dst"], 0))
                res["sent"] += 1
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
print(json.dumps({"pid": os.getpid(), "probes": out}))
"""


@dataclass(frozen=True)
class Probe:
    """`n` UDP datagrams (one socket), `n` TCP connections (one socket each) or `n` ICMP
    messages of `icmp_type` (a raw socket; port unused) to dst:port. answer: wait up to
    `timeout` for what comes back after each UDP datagram or TCP connection (100 bytes)."""

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
    icmp_type: int = 8


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


STREAM = r"""
import json, signal, socket, sys, time
req = json.loads(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
socks = []
for p in req["targets"]:
    fam = socket.AF_INET6 if ":" in p["dst"] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if p["dev"]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, p["dev"].encode())
    if p["mark"]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, p["mark"])
    if p["sport"]:
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", p["sport"]))
    socks.append((s, (p["dst"], p["port"]), p["payload"].encode()))
counts = [{"ok": 0, "eperm": 0, "other": 0} for _ in socks]
print("ready", flush=True)
end = time.monotonic() + req["seconds"]
while not stop and time.monotonic() < end:
    for (s, to, payload), c in zip(socks, counts):
        try:
            s.sendto(payload, to)
            c["ok"] += 1
        except PermissionError:
            c["eperm"] += 1
        except OSError:
            c["other"] += 1
    time.sleep(req["pause"])
print(json.dumps(counts), flush=True)
"""


def start_stream(netns: str, targets: list[Probe], *, cgroup: Path | None = None, seconds: float = 60,
                 pause: float = 0.0005, stdout: int | None = None) -> subprocess.Popen[str]:
    """A background UDP sender: one datagram to each target (dst, port, dev, mark, sport,
    payload of a Probe) every `pause`, until SIGTERM or `seconds`; it prints "ready" once
    its sockets exist and, at the end, per target {"ok", "eperm", "other"} (stream_counts).
    The caller ends it in a finally."""
    req = {"targets": [asdict(t) for t in targets], "seconds": seconds, "pause": pause}
    return spawn_in([sys.executable, "-c", STREAM, json.dumps(req)], netns=netns, cgroup=cgroup, stdout=stdout)


def stream_counts(p: subprocess.Popen[str], *, stop: bool = True) -> list[dict[str, int]]:
    """The counts of a stream started with stdout=subprocess.PIPE, once it ends: stopped
    now (SIGTERM), or with stop=False when its `seconds` are up."""
    if stop:
        p.terminate()
    out, _ = p.communicate(timeout=30)
    counts: list[dict[str, int]] = json.loads(out.strip().splitlines()[-1])
    return counts


def start_flood(netns: str, targets: list[tuple[str, int, str | None]], *, cgroup: Path | None = None,
                seconds: float = 60) -> subprocess.Popen[str]:
    """A stream of 1-byte datagrams to each (dst, port, device or None), every 0.5 ms, its
    output not read: for traffic that must keep flowing while something else happens."""
    return start_stream(netns, [Probe(dst, port, dev=dev, payload="x") for dst, port, dev in targets],
                        cgroup=cgroup, seconds=seconds)


FRAMES = r"""
import socket, struct, sys
dev, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
src = "02:00:00:00:00:02"
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack(f"!{len(b)//2}H", b)); t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
payload = b"leak" * 4
udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton("192.0.2.2"), socket.inet_aton("192.0.2.1"))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
eth = b"\xff" * 6 + bytes.fromhex(src.replace(":", "")) + struct.pack("!H", 0x0800)
tried = 0
for _ in range(n):
    tried += 1
    try:
        s.send(eth + ip + udp)
    except OSError:
        pass  # a drop at netdev egress is reported back to the sender
print(tried)
"""


def send_frames(netns: str, dev: str, n: int) -> int:
    """n broadcast Ethernet frames carrying UDP 192.0.2.2 -> 192.0.2.1:9 written to `dev`
    through an AF_PACKET socket (past routing and the IP hooks); how many were tried."""
    r = run_in([sys.executable, "-c", FRAMES, dev, str(n)], netns=netns)
    assert r.returncode == 0, f"frame sender failed in {netns}: {r.stderr.strip()[-500:]}"
    return int(r.stdout)
