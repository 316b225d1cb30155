"""`ksctl audit`: an active leak self-test of the kill switch on this machine.

From a throwaway cgroup it makes below the policy's [bpf] cgroup (so every layer judges
it as it judges any process), it sends probes out of every non-tunnel interface
(SO_BINDTODEVICE, and raw AF_PACKET frames for the netdev egress chains): TCP, UDP, ICMP
and DNS (UDP and TCP), IPv4 and IPv6, to the targets the machine itself names (each
interface's gateways and neighbours), to the policy's VPN endpoints on ports other than
the endpoint's (and on the endpoint's own port without the endpoint mark), and to any
`--target`. Then it checks that the tunnel path works (DNS to the policy's resolvers),
removes the cgroup, and gives a verdict.

A probe is
  stopped   the kernel refused it on the spot (EPERM, ...), or no answer came and a
            drop counter (nftables, or the BPF counter of the audit's own cgroup) rose
            while it was sent;
  LEAKED    something came back from outside: a TCP handshake or reset, a UDP or DNS
            answer, an echo reply, an ICMP error;
  UNPROVEN  no answer, but nothing refused or counted it either: it may have left;
  allowed   the policy allows it (a LAN it permits, say): not sent.

nftables counters are machine-wide: on a busy machine another process's drop can fall
into a probe's window. The send error and the per-cgroup BPF counters are exact.

Exit: 0 PASS (nothing left, every stop proven, the tunnel path works); 1 FAIL (something
LEAKED or is UNPROVEN, named); 2 bad input; 3 nothing left, but the tunnel path does not
work or no probe could be sent; 4 the audit itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ksbpf.errors import KsbpfError
from ksbpf.policy import Policy, load_policy

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_WARN, EXIT_ERROR = 0, 1, 2, 3, 4
MAX_TARGETS_PER_INTERFACE = 8
PROBE_PORT = 443
DNS_PORT = 53
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # reachable, stale, delay, probe, permanent
# Errors a send or connect returns when the local kernel stops the packet.
LOCAL_REFUSALS = {errno.EPERM, errno.EACCES, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL,
                  errno.ENETDOWN, errno.ENODEV, errno.ENXIO, errno.ENOBUFS}
CANNOT_SEND = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


# =========================================================================== plan


@dataclass
class Interface:
    name: str
    index: int
    up: bool
    mac: str = ""
    addrs: dict[int, list[str]] = field(default_factory=lambda: {4: [], 6: []})
    targets: dict[str, set[str]] = field(default_factory=dict)  # address -> why
    skipped: int = 0

    def add(self, addr: str, why: str) -> None:
        self.targets.setdefault(addr, set()).add(why)


@dataclass
class Probe:
    id: int
    kind: str  # tcp, udp, icmp, dns, dns-tcp, raw
    iface: str
    ifindex: int
    family: int
    addr: str
    port: int
    why: str
    expect: str  # the drop reason the policy gives it
    src: str = ""
    src_mac: str = ""

    def describe(self) -> str:
        host = f"[{self.addr}]" if self.family == 6 and self.port else self.addr
        what = {"dns": "dns/udp", "dns-tcp": "dns/tcp", "raw": "raw frame"}.get(self.kind, self.kind)
        where = f"{host}:{self.port}" if self.port else host
        return f"{what} {where}"


def _oracle(policy: Policy, kind: str, family: int, addr: str, port: int, iface: str, cgroup: str) -> tuple[bool, str]:
    from ksbpf.verdict import Packet, verdict

    proto = {"icmp": "icmp" if family == 4 else "icmpv6", "tcp": "tcp", "dns-tcp": "tcp"}.get(kind, "udp")
    v = verdict(policy, Packet(
        direction="out", proto=proto, dst=ipaddress.ip_address(addr), sport=40000, dport=port, oif=iface,
        cgroup=cgroup, icmp_type=(8 if family == 4 else 128) if kind == "icmp" else None,
    ))
    return v.allow, v.reason.value


def discover(policy: Policy, targets: list[str]) -> list[Interface]:
    """Non-tunnel interfaces and the targets to probe over each. Called inside the
    namespace."""
    from pyroute2 import IPRoute

    from ksbpf.marks import ROUTE_TABLE
    from ksbpf.verdict import interface_matches

    out: dict[int, Interface] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name == "lo" or interface_matches(name, policy.tunnel.interfaces):
                continue
            out[link["index"]] = Interface(name, link["index"], bool(link["flags"] & 1), link.get_attr("IFLA_ADDRESS") or "")
        for a in ipr.get_addr():
            iface = out.get(a["index"])
            if iface is not None and a.get_attr("IFA_ADDRESS"):
                iface.addrs[4 if a["family"] == socket.AF_INET else 6].append(a.get_attr("IFA_ADDRESS"))
        gateways: list[tuple[int, str]] = []
        for r in ipr.get_routes():
            table = r.get_attr("RTA_TABLE") or r["table"]
            if table in (ROUTE_TABLE, 255):
                continue
            if r.get_attr("RTA_GATEWAY") and r.get_attr("RTA_OIF") in out:
                gateways.append((r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY")))
            for hop in r.get_attr("RTA_MULTIPATH") or []:
                if hop.get_attr("RTA_GATEWAY") and hop["oif"] in out:
                    gateways.append((hop["oif"], hop.get_attr("RTA_GATEWAY")))
        neighbours: list[tuple[int, str]] = []
        for n in ipr.get_neighbours():
            dst = n.get_attr("NDA_DST")
            if dst and n["ifindex"] in out and n["state"] & NUD_USABLE and not ipaddress.ip_address(dst).is_multicast:
                neighbours.append((n["ifindex"], dst))
    for idx, gw in gateways:
        out[idx].add(gw, "gateway")
    for iface in out.values():
        for ep in policy.tunnel.endpoints:
            iface.add(str(ep.address), "endpoint")
        for t in targets:
            iface.add(t, "--target")
    for idx, addr in neighbours:
        iface = out[idx]
        if addr in iface.targets or len(iface.targets) < MAX_TARGETS_PER_INTERFACE:
            iface.add(addr, "neighbour")
        else:
            iface.skipped += 1
    return sorted(out.values(), key=lambda i: i.index)


def plan_probes(policy: Policy, interfaces: list[Interface], cgroup: str) -> tuple[list[Probe], list[dict[str, Any]]]:
    """The probes to send, and those the policy allows (not sent)."""
    probes: list[Probe] = []
    allowed: list[dict[str, Any]] = []
    endpoint_ports = {str(e.address): (e.proto, e.port) for e in policy.tunnel.endpoints}

    def add(kind: str, iface: Interface, family: int, addr: str, port: int, why: str) -> None:
        ok, reason = _oracle(policy, kind, family, addr, port, iface.name, cgroup)
        p = Probe(len(probes) + len(allowed), kind, iface.name, iface.index, family, addr, port, why, reason)
        if ok:
            allowed.append({**asdict(p), "reason": reason})
        else:
            probes.append(p)

    for iface in interfaces:
        for addr, whys in sorted(iface.targets.items()):
            fam = ipaddress.ip_address(addr).version
            why = ", ".join(sorted(whys))
            add("tcp", iface, fam, addr, PROBE_PORT, why)
            add("udp", iface, fam, addr, PROBE_PORT, why)
            add("icmp", iface, fam, addr, 0, why)
            add("dns", iface, fam, addr, DNS_PORT, why)
            add("dns-tcp", iface, fam, addr, DNS_PORT, why)
            if addr in endpoint_ports:
                proto, port = endpoint_ports[addr]
                add("tcp" if proto == "tcp" else "udp", iface, fam, addr, port, "endpoint's own port, without the endpoint mark")
        for fam in (4, 6):
            dsts = [a for a in sorted(iface.targets) if ipaddress.ip_address(a).version == fam]
            if not dsts:
                continue
            ok, reason = _oracle(policy, "udp", fam, dsts[0], 9, iface.name, cgroup)
            p = Probe(len(probes) + len(allowed), "raw", iface.name, iface.index, fam, dsts[0], 9, "AF_PACKET, past routing and IP hooks",
                      "raw_egress", src=(iface.addrs[fam] or ["0.0.0.0" if fam == 4 else "::"])[0], src_mac=iface.mac)
            if ok:
                allowed.append({**asdict(p), "reason": reason})
            else:
                probes.append(p)
    return probes, allowed


# =========================================================================== worker


def _dns_query(qid: int) -> bytes:
    name = b"".join(bytes([len(label)]) + label for label in (b"ksbpf-audit", b"invalid")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _raw_frame(p: Probe) -> bytes:
    payload = b"ksbpf-audit"
    src_mac = bytes.fromhex(p.src_mac.replace(":", "")) if p.src_mac else b"\x02\0\0\0\0\x01"
    if p.family == 4:
        udp = struct.pack("!HHHH", 40000, p.port, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         socket.inet_aton(p.src), socket.inet_aton(p.addr))
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        src, dst = socket.inet_pton(socket.AF_INET6, p.src), socket.inet_pton(socket.AF_INET6, p.addr)
        udp = struct.pack("!HHHH", 40000, p.port, 8 + len(payload), 0) + payload
        pseudo = src + dst + struct.pack("!IxxxB", len(udp), 17)
        udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
        ip = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + src + dst
        ethertype = 0x86DD
    return b"\xff" * 6 + src_mac + struct.pack("!H", ethertype) + ip + udp


def _icmp_echo(family: int, ident: int) -> bytes:
    typ = 8 if family == 4 else 128
    body = struct.pack("!BBHHH", typ, 0, 0, ident, 1) + b"ksbpf-audit"
    if family == 4:
        body = body[:2] + struct.pack("!H", _checksum(body)) + body[4:]
    return body  # the kernel fills in the ICMPv6 checksum


class Counters:
    """Drop counters, read before and after each send: nftables by name, BPF for the
    audit's own cgroup by reason."""

    def __init__(self, bpf_instance: str | None, cgroup_id: int) -> None:
        self.cgroup_id = cgroup_id
        self.bpf: Any = None
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


def _sockaddr(p: Probe, port: int | None = None) -> tuple[Any, ...]:
    port = p.port if port is None else port
    if p.family == 6:
        scope = p.ifindex if ipaddress.ip_address(p.addr).is_link_local else 0
        return (p.addr, port, 0, scope)
    return (p.addr, port)


def _open(p: Probe) -> socket.socket:
    fam = socket.AF_INET6 if p.family == 6 else socket.AF_INET
    if p.kind == "raw":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((p.iface, 0))
        return s
    if p.kind == "icmp":
        s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMP if p.family == 4 else socket.IPPROTO_ICMPV6)
    elif p.kind in ("tcp", "dns-tcp"):
        s = socket.socket(fam, socket.SOCK_STREAM)
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, p.iface.encode())
    s.setblocking(False)
    return s


def _send(p: Probe, s: socket.socket, ident: int) -> str:
    """The synchronous part: 'pending' (sent, wait for an answer) or raises OSError."""
    if p.kind == "raw":
        s.send(_raw_frame(p))
        return "pending"
    if p.kind == "icmp":
        s.sendto(_icmp_echo(p.family, ident), _sockaddr(p, 0))
        return "pending"
    if p.kind in ("tcp", "dns-tcp"):
        err = s.connect_ex(_sockaddr(p))
        if err in (0, errno.EINPROGRESS):
            return "pending"
        raise OSError(err, os.strerror(err))
    s.connect(_sockaddr(p))
    s.send(_dns_query(ident) if p.kind == "dns" else b"ksbpf-audit\n")
    return "pending"


def _answer(p: Probe, s: socket.socket, ident: int) -> str | None:
    """Called when the socket is ready: what came back, or None (not ours, keep waiting)."""
    if p.kind in ("tcp", "dns-tcp"):
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
    if p.kind == "icmp":
        if p.family == 4:
            data = data[(data[0] & 0x0F) * 4:]
        want = 0 if p.family == 4 else 129
        if len(data) >= 8 and data[0] == want and struct.unpack("!H", data[4:6])[0] == ident:
            return f"echo reply from {peer[0]}"
        return None
    if p.kind == "dns":
        return f"DNS answer ({len(data)} bytes)"
    return f"UDP answer ({len(data)} bytes)"


def run_probes(probes: list[Probe], timeout: float, counters: Counters) -> list[dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    pending: dict[int, tuple[Probe, socket.socket, int]] = {}
    for p in probes:
        ident = secrets.randbelow(0xFFFF) + 1
        try:
            s = _open(p)
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
        rlist = [s for pid, (p, s, _) in pending.items() if p.kind not in ("tcp", "dns-tcp", "raw")]
        wlist = [s for pid, (p, s, _) in pending.items() if p.kind in ("tcp", "dns-tcp")]
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
                s.send(_dns_query(ident))
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


def worker_main() -> int:
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


# =========================================================================== driver


def _audit_cgroup(policy: Policy) -> Path:
    from ksbpf.linux.cgroup import cgroup2_mount, cgroup_dir

    parent = cgroup_dir(policy.bpf.cgroup)
    if not parent.is_dir():
        parent = cgroup2_mount()
    d = parent / f"ksbpf-audit-{secrets.token_hex(3)}"
    d.mkdir()
    return d


def _remove_cgroup(d: Path) -> None:
    import signal

    for _ in range(100):
        try:
            pids = (d / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def _route_oif(netns_name: str | None, server: str) -> str:
    from pyroute2 import IPRoute

    from ksbpf.linux.netns import netns

    try:
        with netns(netns_name), IPRoute() as ipr:
            route = ipr.route("get", dst=server)[0]
            idx = route.get_attr("RTA_OIF")
            link = ipr.get_links(idx)[0] if idx else None
            return str(link.get_attr("IFLA_IFNAME")) if link is not None else "?"
    except (OSError, KsbpfError, IndexError) as e:
        return f"? ({e})"


def _layers(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from ksbpf.linux.engine import LinuxEngine, state_dir_for

    state = state_dir_for(args.netns, Path(args.state_dir)) if getattr(args, "state_dir", None) else None
    try:
        return {n: s.as_dict() for n, s in LinuxEngine(netns=args.netns, state_dir=state).status().items()}
    except KsbpfError as e:
        return {"status": {"engaged": False, "detail": str(e)}}


def audit(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, probe (in a worker process in the audit cgroup), clean up, judge."""
    from ksbpf.linux.engine import instance_name
    from ksbpf.linux.netns import netns

    policy = load_policy(args.config)
    targets = []
    for t in getattr(args, "target", None) or []:
        try:
            targets.append(str(ipaddress.ip_address(t)))
        except ValueError:
            from ksbpf.errors import PolicyError

            raise PolicyError(f"{t!r} is not an IP address", source="ksctl audit", key="--target") from None
    timeout = float(getattr(args, "timeout", None) or 1.0)
    report: dict[str, Any] = {"netns": args.netns, "policy": str(args.config), "layers": _layers(args)}
    cg = _audit_cgroup(policy)
    try:
        from ksbpf.linux.cgroup import relative_path

        rel = relative_path(cg)
        report["cgroup"] = rel
        with netns(args.netns):
            interfaces = discover(policy, targets)
        probes, allowed = plan_probes(policy, interfaces, rel)
        job = {
            "netns": args.netns, "cgroup": str(cg), "cgroup_id": os.stat(cg).st_ino, "timeout": timeout,
            "bpf_instance": instance_name(args.netns), "probes": [asdict(p) for p in probes],
            "dns_servers": [str(s) for s in policy.dns.servers],
        }
        proc = subprocess.run([sys.executable, "-m", "ksbpf.audit", "worker"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=60 + timeout * (len(probes) + 10))
        if proc.returncode != 0:
            raise KsbpfError(f"audit worker failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
        out = json.loads(proc.stdout)
    finally:
        _remove_cgroup(cg)
    report["cgroup_removed"] = not cg.exists()
    by_id = {r["id"]: r for r in out["results"]}
    report["interfaces"] = [
        {"name": i.name, "index": i.index, "up": i.up, "targets": {a: sorted(w) for a, w in sorted(i.targets.items())},
         "neighbours_not_probed": i.skipped}
        for i in interfaces
    ]
    report["probes"] = [{**asdict(p), **by_id.get(p.id, {"outcome": "unproven", "how": "no result"})} for p in probes]
    report["allowed"] = allowed
    for t in out["tunnel"]:
        if t.get("ok"):
            t["via"] = _route_oif(args.netns, t["server"])
    report["tunnel"] = out["tunnel"]
    return judge(report)


def judge(report: dict[str, Any]) -> dict[str, Any]:
    probes = report["probes"]
    leaked = [p for p in probes if p["outcome"] == "leaked"]
    unproven = [p for p in probes if p["outcome"] == "unproven"]
    stopped = [p for p in probes if p["outcome"] == "stopped"]
    tunnel = report["tunnel"]
    tunnel_ok = bool(tunnel) and all(t.get("ok") for t in tunnel)
    if leaked or unproven:
        verdict, code = "FAIL", EXIT_FAIL
    elif not stopped or (tunnel and not tunnel_ok):
        verdict, code = "WARN", EXIT_WARN
    else:
        verdict, code = "PASS", EXIT_PASS
    report.update(verdict=verdict, exit=code, leaked=[_name(p) for p in leaked], unproven=[_name(p) for p in unproven],
                  summary={"probes": len(probes), "stopped": len(stopped), "leaked": len(leaked), "unproven": len(unproven),
                           "skipped": sum(p["outcome"] == "skipped" for p in probes), "allowed": len(report["allowed"])})
    return report


def _name(p: dict[str, Any]) -> str:
    return f"{Probe(**{k: p[k] for k in Probe.__dataclass_fields__}).describe()} out of {p['iface']} ({p['how']})"


def _counted(p: dict[str, Any]) -> str:
    c = p.get("counted") or {}
    if not c:
        return ""
    parts = [f"{k.replace(':', ' ')} +{v}" for k, v in sorted(c.items())]
    note = "" if any(k.split(":", 1)[1].startswith(p["expect"]) for k in c) else f" (policy says {p['expect']})"
    return "; counted " + ", ".join(parts) + note


def render(report: dict[str, Any], out: Any = sys.stdout) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

    say(f"ksbpf audit{' [netns ' + report['netns'] + ']' if report['netns'] else ''}: policy {report['policy']}")
    say("  layers: " + ", ".join(f"{n} {'engaged' if s['engaged'] else 'NOT ENGAGED'}" for n, s in report["layers"].items()))
    say(f"  probes sent from cgroup {report['cgroup']} ({'removed' if report['cgroup_removed'] else 'NOT REMOVED'} afterwards)")
    mark = {"stopped": "stopped ", "leaked": "LEAKED  ", "unproven": "UNPROVEN", "skipped": "skipped "}
    for iface in report["interfaces"]:
        say()
        extra = f", {iface['neighbours_not_probed']} more neighbours not probed" if iface["neighbours_not_probed"] else ""
        say(f"  {iface['name']} (ifindex {iface['index']}, {'up' if iface['up'] else 'down'}): "
            f"{len(iface['targets'])} targets{extra}")
        for addr, whys in iface["targets"].items():
            say(f"    target {addr} ({', '.join(whys)})")
        for p in report["probes"]:
            if p["iface"] == iface["name"]:
                what = Probe(**{k: p[k] for k in Probe.__dataclass_fields__}).describe()
                note = " [the endpoint's flow, without its mark]" if p["why"].startswith("endpoint's own port") else ""
                say(f"    {mark.get(p['outcome'], p['outcome'])} {what:<32} {p['how']}{_counted(p)}{note}")
        for a in report["allowed"]:
            if a["iface"] == iface["name"]:
                say(f"    allowed  {Probe(**{k: a[k] for k in Probe.__dataclass_fields__}).describe():<32} the policy allows it ({a['reason']})")
    if not report["interfaces"]:
        say("  no interface other than loopback and the tunnel: nothing to probe")
    say()
    for t in report["tunnel"]:
        if t.get("ok"):
            say(f"  tunnel path: DNS to {t['server']} answered in {t['ms']} ms via {t.get('via', '?')}")
        else:
            say(f"  tunnel path: DNS to {t['server']}: {t['detail']}")
    if not report["tunnel"]:
        say("  tunnel path: not checked (the policy names no resolver)")
    s = report["summary"]
    say()
    if report["verdict"] == "FAIL":
        say(f"FAIL: {s['leaked']} probe(s) LEAKED and {s['unproven']} UNPROVEN of {s['probes']}:")
        for line in report["leaked"]:
            say(f"  LEAKED   {line}")
        for line in report["unproven"]:
            say(f"  UNPROVEN {line}")
    elif report["verdict"] == "WARN":
        why = "no probe could be sent" if not s["stopped"] else "the tunnel path does not work"
        say(f"WARN: nothing left outside the tunnel ({s['stopped']} of {s['probes']} probes stopped), but {why}")
    else:
        say(f"PASS: all {s['stopped']} probes over {len(report['interfaces'])} interface(s) were stopped, "
            f"each refused or counted; the tunnel path works")
    if s["skipped"] or s["allowed"]:
        say(f"  ({s['skipped']} could not be sent here, {s['allowed']} allowed by the policy and not sent)")


def run_audit(args: argparse.Namespace) -> int:
    """`ksctl [--netns N] audit --config FILE [--target ADDR]... [--timeout S] [--json]`."""
    from ksbpf.errors import PolicyError

    if os.geteuid() != 0:
        print("ksctl audit: needs root (a cgroup, raw sockets, the drop counters)", file=sys.stderr)
        return EXIT_ERROR
    try:
        report = audit(args)
    except PolicyError:
        raise
    except (KsbpfError, OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"ksctl audit: could not run: {e}", file=sys.stderr)
        return EXIT_ERROR
    if getattr(args, "json", False):
        print(json.dumps(report, indent=1, default=str))
    else:
        render(report)
    return int(report["exit"])


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        sys.exit(worker_main())
    print("usage: python -m ksbpf.audit worker  (run by `ksctl audit`)", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
