"""The audit's worker, a child process of `ksctl audit` (`python -m ksbpf.audit worker`,
a job as JSON on stdin, results as JSON on stdout). It joins the audit cgroup before it
opens any socket (a socket keeps the cgroup it was made in), so every layer judges its
probes as any process's. Each probe is sent with the drop counters read around it;
then it waits for answers, and checks the tunnel path (DNS to the policy's resolvers)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksbpf.audit.packets import dns_query, icmp_echo, raw_frame, sockaddr
from ksbpf.audit.plan import DNS_PORT, Probe, ProbeKind
from ksbpf.errors import KsbpfError

if TYPE_CHECKING:
    from ksbpf.linux.bpf.layer import BpfLayer

# Errors a send or connect returns when the local kernel stops the packet.
LOCAL_REFUSALS = {errno.EPERM, errno.EACCES, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL,
                  errno.ENETDOWN, errno.ENODEV, errno.ENXIO, errno.ENOBUFS}
CANNOT_SEND = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


class Counters:
    """Drop counters, read before and after each send: nftables by name, BPF for the
    audit's own cgroup by reason."""

    def __init__(self, bpf_instance: str | None, cgroup_id: int) -> None:
        self.cgroup_id = cgroup_id
        self.bpf: BpfLayer | None = None
        if bpf_instance:
            try:
                from ksbpf.linux.bpf.layer import BpfLayer

                self.bpf = BpfLayer(bpf_instance)
            except (ImportError, KsbpfError):
                self.bpf = None
        import nftables

        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)

    def read(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fam in ("inet", "netdev"):
            rc, text, _ = self.nft.cmd(f"list counters table {fam} ksbpf")
            if rc == 0 and text:
                for o in json.loads(text).get("nftables", []):
                    c = o.get("counter")
                    if c and str(c.get("name", "")).startswith("drop_"):
                        out[f"nftables:{c['name'][5:]}"] = int(c.get("packets", 0))
        if self.bpf is not None:
            with contextlib.suppress(KsbpfError, OSError):
                for reason, cg, packets, _ in self.bpf.counters():
                    if cg == self.cgroup_id:
                        out[f"bpf:{reason}"] = int(packets)
        return out


def open_socket(p: Probe) -> socket.socket:
    fam = socket.AF_INET6 if p.family == 6 else socket.AF_INET
    if p.kind == ProbeKind.RAW:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((p.iface, 0))
        return s
    if p.kind == ProbeKind.ICMP:
        s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMP if p.family == 4 else socket.IPPROTO_ICMPV6)
    elif p.kind.connects:
        s = socket.socket(fam, socket.SOCK_STREAM)
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, p.iface.encode())
    s.setblocking(False)
    return s


def _send(p: Probe, s: socket.socket, ident: int) -> str:
    """The synchronous part: 'pending' (sent, wait for an answer) or raises OSError."""
    if p.kind == ProbeKind.RAW:
        s.send(raw_frame(p))
        return "pending"
    if p.kind == ProbeKind.ICMP:
        s.sendto(icmp_echo(p.family, ident), sockaddr(p, 0))
        return "pending"
    if p.kind.connects:
        err = s.connect_ex(sockaddr(p))
        if err in (0, errno.EINPROGRESS):
            return "pending"
        raise OSError(err, os.strerror(err))
    s.connect(sockaddr(p))
    s.send(dns_query(ident) if p.kind == ProbeKind.DNS else b"ksbpf-audit\n")
    return "pending"


def _answer(p: Probe, s: socket.socket, ident: int) -> str | None:
    """Called when the socket is ready: what came back, or None (not ours, keep waiting)."""
    if p.kind.connects:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            return "TCP handshake completed"
        return f"{errno.errorcode.get(err, err)} came back ({os.strerror(err)})"
    try:
        data, peer = s.recvfrom(65536)
    except BlockingIOError:
        return None
    except OSError as e:
        return f"{errno.errorcode.get(e.errno or 0, e.errno)} came back ({e.strerror})"
    if p.kind == ProbeKind.ICMP:
        if p.family == 4:
            data = data[(data[0] & 0x0F) * 4:]
        want = 0 if p.family == 4 else 129
        if len(data) >= 8 and data[0] == want and struct.unpack("!H", data[4:6])[0] == ident:
            return f"echo reply from {peer[0]}"
        return None
    if p.kind == ProbeKind.DNS:
        return f"DNS answer ({len(data)} bytes)"
    return f"UDP answer ({len(data)} bytes)"


def run_probes(probes: list[Probe], timeout: float, counters: Counters) -> list[dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    pending: dict[int, tuple[Probe, socket.socket, int]] = {}
    for p in probes:
        ident = secrets.randbelow(0xFFFF) + 1
        try:
            s = open_socket(p)
        except OSError as e:
            results[p.id] = {"outcome": "skipped", "how": f"cannot open a socket: {e.strerror}"}
            continue
        before = counters.read()
        try:
            _send(p, s, ident)
            sync_err = None
        except OSError as e:
            sync_err = e
        after = counters.read()
        counted = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
        if sync_err is not None:
            s.close()
            code = sync_err.errno or 0
            name = errno.errorcode.get(code, str(code))
            if code in CANNOT_SEND:
                results[p.id] = {"outcome": "skipped", "how": f"cannot send here ({name}: {sync_err.strerror})", "counted": counted}
            elif code in LOCAL_REFUSALS:
                results[p.id] = {"outcome": "stopped", "how": f"refused by the kernel ({name})", "counted": counted}
            else:
                results[p.id] = {"outcome": "leaked", "how": f"{name} came back ({sync_err.strerror})", "counted": counted}
            continue
        results[p.id] = {"outcome": "silent", "how": "", "counted": counted}
        pending[p.id] = (p, s, ident)

    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        rlist = [s for pid, (p, s, _) in pending.items() if not p.kind.connects and p.kind != ProbeKind.RAW]
        wlist = [s for pid, (p, s, _) in pending.items() if p.kind.connects]
        if not rlist and not wlist:
            break
        r, w, _ = select.select(rlist, wlist, [], max(0.0, deadline - time.monotonic()))
        for pid, (p, s, ident) in list(pending.items()):
            if s in r or s in w:
                what = _answer(p, s, ident)
                if what is not None:
                    results[pid].update(outcome="leaked", how=what)
                    s.close()
                    del pending[pid]
    for _pid, (_p, s, _) in pending.items():
        s.close()
    for res in results.values():
        if res["outcome"] == "silent":
            if res.get("counted"):
                res["outcome"] = "stopped"
                res["how"] = "no answer; dropped and counted"
            else:
                res["outcome"] = "unproven"
                res["how"] = "sent without error, no answer, and no drop counter rose: it may have left"
    return [{"id": pid, **res} for pid, res in sorted(results.items())]


def check_tunnel(servers: list[str], timeout: float) -> list[dict[str, Any]]:
    """DNS to each configured resolver, routed as any process's traffic is."""
    out = []
    for server in servers:
        fam = socket.AF_INET6 if ":" in server else socket.AF_INET
        ident = secrets.randbelow(0xFFFF) + 1
        t0 = time.monotonic()
        res: dict[str, Any] = {"server": server}
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.connect((server, DNS_PORT))
                s.send(dns_query(ident))
                while True:
                    data = s.recv(65536)
                    if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == ident:
                        break
            res.update(ok=True, ms=round((time.monotonic() - t0) * 1000, 1))
        except TimeoutError:
            res.update(ok=False, detail=f"no answer within {timeout} s")
        except OSError as e:
            res.update(ok=False, detail=f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}")
        out.append(res)
    return out


def main() -> int:
    """`python -m ksbpf.audit worker`: joins the audit cgroup before opening any socket
    (a socket keeps the cgroup it was made in), enters the namespace, probes, reports."""
    from ksbpf.linux.netns import netns

    job = json.load(sys.stdin)
    Path(job["cgroup"], "cgroup.procs").write_text(f"{os.getpid()}\n")
    with netns(job["netns"]):
        counters = Counters(job.get("bpf_instance"), int(job["cgroup_id"]))
        probes = [Probe(**p) for p in job["probes"]]
        results = run_probes(probes, float(job["timeout"]), counters)
        tunnel = check_tunnel(job["dns_servers"], float(job["timeout"]) * 2)
    json.dump({"results": results, "tunnel": tunnel}, sys.stdout)
    return 0
