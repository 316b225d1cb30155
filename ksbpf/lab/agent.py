"""The lab's helper process: services (echo, whoami, DNS) and probes (tcp, udp, dns, ping,
a traffic generator), run inside a lab namespace.

Standard library only and run by path (`python -I -S .../ksbpf/lab/agent.py ...`), so a
probe costs one interpreter start and nothing from ksbpf or site-packages. The unit tests
import its DNS codec.

Every probe prints one JSON line {"ok": bool, "detail": str} and exits 0 when ok, 1 when not.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
SO_MARK = getattr(socket, "SO_MARK", 36)
PAYLOAD = b"ksbpf-lab-probe\n"

# --------------------------------------------------------------------------- DNS codec

QTYPES = {"A": 1, "AAAA": 28, "TXT": 16}


def dns_encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if not label:
            continue
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError(f"label {label!r} is longer than 63 bytes")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def dns_query_packet(name: str, qtype: int = 1, qid: int = 0x4B53) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD, one question
    return header + dns_encode_name(name) + struct.pack("!HH", qtype, 1)


def _read_name(data: bytes, off: int) -> tuple[str, int]:
    """A possibly compressed name at `off` -> (name, offset after it in the original)."""
    labels: list[str] = []
    end = -1
    for _ in range(128):
        if off >= len(data):
            raise ValueError("name runs past the message")
        n = data[off]
        if n == 0:
            off += 1
            break
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(data):
                raise ValueError("truncated compression pointer")
            if end < 0:
                end = off + 2
            off = ((n & 0x3F) << 8) | data[off + 1]
            continue
        if n & 0xC0:
            raise ValueError("bad label type")
        labels.append(data[off + 1 : off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    else:
        raise ValueError("too many labels or a pointer loop")
    return ".".join(labels), (end if end >= 0 else off)


def dns_parse_query(data: bytes) -> tuple[int, str, int, int]:
    """A query -> (id, name, qtype, offset just after the question)."""
    if len(data) < 12:
        raise ValueError("short DNS message")
    qid, flags, qd = struct.unpack("!HHH", data[:6])
    if flags & 0x8000 or qd != 1:
        raise ValueError("not a single-question query")
    name, off = _read_name(data, 12)
    if off + 4 > len(data):
        raise ValueError("truncated question")
    qtype, _qclass = struct.unpack("!HH", data[off : off + 4])
    return qid, name, qtype, off + 4


def dns_answer_packet(query: bytes, a: str | None, aaaa: str | None, ttl: int = 60) -> bytes:
    """The answer to `query`: A -> `a`, AAAA -> `aaaa`, anything else NOERROR without data."""
    qid, _name, qtype, qend = dns_parse_query(query)
    rdata = b""
    if qtype == QTYPES["A"] and a:
        rdata = ipaddress.IPv4Address(a).packed
    elif qtype == QTYPES["AAAA"] and aaaa:
        rdata = ipaddress.IPv6Address(aaaa).packed
    ancount = 1 if rdata else 0
    flags = 0x8180  # QR, RD, RA, NOERROR
    out = struct.pack("!HHHHHH", qid, flags, 1, ancount, 0, 0) + query[12:qend]
    if rdata:
        out += struct.pack("!HHHIH", 0xC00C, qtype, 1, ttl, len(rdata)) + rdata
    return out


def dns_parse_answer(data: bytes, qid: int | None = None) -> tuple[int, list[str]]:
    """A response -> (rcode, [addresses in A/AAAA answers])."""
    if len(data) < 12:
        raise ValueError("short DNS message")
    rid, flags, qd, an = struct.unpack("!HHHH", data[:8])
    if qid is not None and rid != qid:
        raise ValueError(f"answer id {rid:#x} does not match query id {qid:#x}")
    if not flags & 0x8000:
        raise ValueError("not a response")
    off = 12
    for _ in range(qd):
        _, off = _read_name(data, off)
        off += 4
    addrs: list[str] = []
    for _ in range(an):
        _, off = _read_name(data, off)
        if off + 10 > len(data):
            raise ValueError("truncated answer")
        rtype, _rclass, _ttl, rdlen = struct.unpack("!HHIH", data[off : off + 10])
        off += 10
        rdata = data[off : off + rdlen]
        off += rdlen
        if rtype == QTYPES["A"] and rdlen == 4:
            addrs.append(str(ipaddress.IPv4Address(rdata)))
        elif rtype == QTYPES["AAAA"] and rdlen == 16:
            addrs.append(str(ipaddress.IPv6Address(rdata)))
    return flags & 0x000F, addrs


# --------------------------------------------------------------------------- sockets


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def parse_hostport(text: str) -> tuple[str, int]:
    """'ADDR,PORT' (commas, since IPv6 addresses are full of colons)."""
    host, _, port = text.rpartition(",")
    return host, int(port)


def _listener(kind: int, addr: str, port: int) -> socket.socket:
    fam = family_of(addr)
    s = socket.socket(fam, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The tunnel's addresses appear only once wireguard-go has made its device.
    s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if addr == "::" else 1)
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    return s


def _peer(addr: tuple[object, ...]) -> str:
    host = str(addr[0])
    return host.removeprefix("::ffff:") if "." in host else host


def _serve_tcp(sock: socket.socket, handle: Callable[[socket.socket, str], None]) -> None:
    while True:
        conn, addr = sock.accept()
        conn.settimeout(30)
        threading.Thread(target=_tcp_conn, args=(conn, _peer(addr), handle), daemon=True).start()


def _tcp_conn(conn: socket.socket, peer: str, handle: Callable[[socket.socket, str], None]) -> None:
    try:
        with conn:
            handle(conn, peer)
    except OSError:
        pass


def _tcp_echo(conn: socket.socket, peer: str) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _tcp_whoami(conn: socket.socket, peer: str) -> None:
    conn.sendall(peer.encode() + b"\n")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("short read")
        buf += chunk
    return buf


def _tcp_dns(a: str | None, aaaa: str | None) -> Callable[[socket.socket, str], None]:
    def handle(conn: socket.socket, peer: str) -> None:
        while True:
            (n,) = struct.unpack("!H", _recv_exact(conn, 2))
            reply = dns_answer_packet(_recv_exact(conn, n), a, aaaa)
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    return handle


def _serve_udp(sock: socket.socket, reply: Callable[[bytes, str], bytes | None]) -> None:
    while True:
        data, addr = sock.recvfrom(65536)
        try:
            out = reply(data, _peer(addr))
        except ValueError:
            continue
        if out is not None:
            try:
                sock.sendto(out, addr)
            except OSError:
                pass


def serve(args: argparse.Namespace) -> int:
    # Blocked before any thread starts, so sigwait() below is the only taker.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    jobs: list[tuple[Callable[..., None], tuple[object, ...]]] = []
    for spec in args.tcp_echo:
        jobs.append((_serve_tcp, (_listener(socket.SOCK_STREAM, *parse_hostport(spec)), _tcp_echo)))
    for spec in args.udp_echo:
        jobs.append((_serve_udp, (_listener(socket.SOCK_DGRAM, *parse_hostport(spec)), lambda d, p: d)))
    for spec in args.whoami:
        host, port = parse_hostport(spec)
        jobs.append((_serve_tcp, (_listener(socket.SOCK_STREAM, host, port), _tcp_whoami)))
        jobs.append((_serve_udp, (_listener(socket.SOCK_DGRAM, host, port), lambda d, p: p.encode() + b"\n")))
    for spec in args.dns:
        # ADDR,PORT,A,AAAA
        parts = spec.split(",")
        host, port, a, aaaa = parts[0], int(parts[1]), parts[2] or None, parts[3] or None
        jobs.append((_serve_tcp, (_listener(socket.SOCK_STREAM, host, port), _tcp_dns(a, aaaa))))
        jobs.append((
            _serve_udp,
            (_listener(socket.SOCK_DGRAM, host, port), lambda d, p, a=a, aaaa=aaaa: dns_answer_packet(d, a, aaaa)),
        ))
    for fn, fargs in jobs:
        threading.Thread(target=fn, args=fargs, daemon=True).start()
    if args.ready:
        tmp = args.ready + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, args.ready)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


# --------------------------------------------------------------------------- probes


def _client_socket(args: argparse.Namespace, fam: socket.AddressFamily, kind: int, proto: int = 0) -> socket.socket:
    s = socket.socket(fam, kind, proto)
    if args.mark:
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, args.mark)
    if args.device:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.device.encode())
    if args.bind or args.sport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((args.bind or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), args.sport or 0))
    s.settimeout(args.timeout)
    return s


def _result(ok: bool, detail: str) -> int:
    print(json.dumps({"ok": ok, "detail": detail}), flush=True)
    return 0 if ok else 1


def _err(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timeout"
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, str(e.errno)) + f" ({e.strerror})"
    return f"{type(e).__name__}: {e}"


def probe_tcp(args: argparse.Namespace) -> int:
    try:
        with _client_socket(args, family_of(args.addr), socket.SOCK_STREAM) as s:
            s.connect((args.addr, args.port))
            s.sendall(PAYLOAD)
            data = s.recv(4096)
    except (OSError, ValueError) as e:
        return _result(False, _err(e))
    if not data:
        return _result(False, "connected, closed without reply")
    return _result(True, data.decode("utf-8", "replace").strip())


def probe_udp(args: argparse.Namespace) -> int:
    try:
        with _client_socket(args, family_of(args.addr), socket.SOCK_DGRAM) as s:
            s.sendto(PAYLOAD, (args.addr, args.port))
            data, _ = s.recvfrom(4096)
    except (OSError, ValueError) as e:
        return _result(False, _err(e))
    return _result(True, data.decode("utf-8", "replace").strip())


def probe_dns(args: argparse.Namespace) -> int:
    qid = int.from_bytes(os.urandom(2), "big")
    query = dns_query_packet(args.name, QTYPES[args.qtype], qid)
    try:
        if args.tcp:
            with _client_socket(args, family_of(args.server), socket.SOCK_STREAM) as s:
                s.connect((args.server, args.port))
                s.sendall(struct.pack("!H", len(query)) + query)
                (n,) = struct.unpack("!H", _recv_exact(s, 2))
                data = _recv_exact(s, n)
        else:
            with _client_socket(args, family_of(args.server), socket.SOCK_DGRAM) as s:
                s.sendto(query, (args.server, args.port))
                data, _ = s.recvfrom(4096)
        rcode, addrs = dns_parse_answer(data, qid)
    except (OSError, ValueError, ConnectionError) as e:
        return _result(False, _err(e))
    if rcode != 0:
        return _result(False, f"rcode {rcode}")
    return _result(bool(addrs), " ".join(addrs) or "no data")


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def probe_ping(args: argparse.Namespace) -> int:
    v6 = family_of(args.addr) == socket.AF_INET6
    ident = os.getpid() & 0xFFFF
    body = struct.pack("!HH", ident, 1) + PAYLOAD
    if v6:
        # The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
        packet = struct.pack("!BBH", 128, 0, 0) + body
    else:
        packet = struct.pack("!BBH", 8, 0, _icmp_checksum(struct.pack("!BBH", 8, 0, 0) + body)) + body
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    try:
        with _client_socket(args, family_of(args.addr), socket.SOCK_RAW, proto) as s:
            s.sendto(packet, (args.addr, 0))
            deadline = time.monotonic() + args.timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                data, addr = s.recvfrom(4096)
                if not v6:
                    data = data[(data[0] & 0x0F) * 4 :]
                if len(data) >= 8 and data[0] == (129 if v6 else 0) and data[4:6] == body[:2]:
                    return _result(True, f"reply from {_peer(addr)}")
    except (OSError, ValueError) as e:
        return _result(False, _err(e))
    return _result(False, "timeout")


def udp4_frame(src_mac: bytes, src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A broadcast Ethernet frame carrying IPv4/UDP, as a raw (AF_PACKET) sender writes it."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # UDP checksum 0: none
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    ip = ip[:10] + struct.pack("!H", _icmp_checksum(ip)) + ip[12:]
    return b"\xff" * 6 + src_mac + b"\x08\x00" + ip + udp


def probe_raw(args: argparse.Namespace) -> int:
    """Write raw frames to a device (AF_PACKET): past routing and the IP stack's hooks."""
    try:
        with open(f"/sys/class/net/{args.device}/address") as f:
            mac = bytes.fromhex(f.read().strip().replace(":", ""))
        frame = udp4_frame(mac, args.src, args.addr, args.sport or 40000, args.port, PAYLOAD)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((args.device, 0))
            for _ in range(args.count):
                s.send(frame)
    except OSError as e:
        return _result(False, _err(e))
    return _result(True, f"{args.count} frame(s) written to {args.device}")


# --------------------------------------------------------------------------- traffic


class _Flow:
    """One target of the traffic generator: sends on every tick, counts replies."""

    def __init__(self, spec: str, args: argparse.Namespace) -> None:
        self.kind, rest = spec.split(",", 1)
        self.addr, self.port = parse_hostport(rest)
        self.label = f"{self.kind} {self.addr} {self.port}"
        self.args = args
        self.sent = self.received = self.errors = 0
        self.fam = family_of(self.addr)
        self.sock: socket.socket | None = None
        self.pending: list[tuple[float, socket.socket]] = []
        self.last_error = ""

    def fail(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = _err(e)

    def tick(self) -> None:
        try:
            if self.kind in ("udp", "dns"):
                if self.sock is None:
                    self.sock = _client_socket(self.args, self.fam, socket.SOCK_DGRAM)
                    self.sock.setblocking(False)
                data = dns_query_packet("lab.example", 1) if self.kind == "dns" else PAYLOAD
                self.sock.sendto(data, (self.addr, self.port))
            elif self.kind == "tcp":
                s = _client_socket(self.args, self.fam, socket.SOCK_STREAM)
                s.setblocking(False)
                s.connect_ex((self.addr, self.port))
                self.pending.append((time.monotonic(), s))
            elif self.kind == "stream":
                if self.sock is None:
                    s = _client_socket(self.args, self.fam, socket.SOCK_STREAM)
                    s.settimeout(1.0)
                    s.connect((self.addr, self.port))
                    s.setblocking(False)
                    self.sock = s
                self.sock.send(PAYLOAD)
            self.sent += 1
        except OSError as e:
            self.fail(e)
            if self.kind == "stream" and self.sock is not None:
                self.sock.close()
                self.sock = None

    def poll(self) -> None:
        if self.sock is not None:
            try:
                while True:
                    data = self.sock.recv(65536)
                    if not data:
                        raise ConnectionResetError(errno.ECONNRESET, "closed by peer")
                    self.received += 1 if self.kind != "stream" else data.count(PAYLOAD[-1:])
            except BlockingIOError:
                pass
            except OSError as e:
                self.fail(e)
                if self.kind == "stream":
                    self.sock.close()
                    self.sock = None
        now = time.monotonic()
        keep = []
        for started, s in self.pending:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            connected = err == 0 and select.select([], [s], [], 0)[1]
            if connected:
                self.received += 1
                s.close()
            elif err or now - started > 1.0:
                if err:
                    self.fail(OSError(err, os.strerror(err)))
                s.close()
            else:
                keep.append((started, s))
        self.pending = keep

    def close(self) -> None:
        for _, s in self.pending:
            s.close()
        if self.sock is not None:
            self.sock.close()

    def summary(self) -> dict[str, object]:
        return {"sent": self.sent, "received": self.received, "errors": self.errors, "last_error": self.last_error}


def traffic(args: argparse.Namespace) -> int:
    """Send to every target each `interval` until SIGTERM/SIGINT or `duration`; print counts."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    flows = [_Flow(spec, args) for spec in args.target]
    deadline = time.monotonic() + args.duration if args.duration else None
    if args.ready:
        with open(args.ready, "w") as f:
            f.write(f"{os.getpid()}\n")
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        for flow in flows:
            flow.tick()
        stop.wait(args.interval)
        for flow in flows:
            flow.poll()
    time.sleep(min(0.2, args.interval * 5))
    for flow in flows:
        flow.poll()
        flow.close()
    print(json.dumps({f.label: f.summary() for f in flows}), flush=True)
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab_agent")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve")
    s.add_argument("--tcp-echo", action="append", default=[], metavar="ADDR,PORT")
    s.add_argument("--udp-echo", action="append", default=[], metavar="ADDR,PORT")
    s.add_argument("--whoami", action="append", default=[], metavar="ADDR,PORT")
    s.add_argument("--dns", action="append", default=[], metavar="ADDR,PORT,A,AAAA")
    s.add_argument("--ready", help="file written once every socket is bound")
    s.set_defaults(fn=serve)

    def client(name: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name)
        c.add_argument("--timeout", type=float, default=1.0)
        c.add_argument("--mark", type=lambda v: int(v, 0), default=0, help="SO_MARK")
        c.add_argument("--device", help="SO_BINDTODEVICE")
        c.add_argument("--bind", help="source address")
        c.add_argument("--sport", type=int, default=0, help="source port")
        return c

    for name, fn in (("tcp", probe_tcp), ("udp", probe_udp)):
        c = client(name)
        c.add_argument("addr")
        c.add_argument("port", type=int)
        c.set_defaults(fn=fn)
    c = client("dns")
    c.add_argument("server")
    c.add_argument("name")
    c.add_argument("--qtype", choices=sorted(QTYPES), default="A")
    c.add_argument("--port", type=int, default=53)
    c.add_argument("--tcp", action="store_true")
    c.set_defaults(fn=probe_dns)
    c = client("ping")
    c.add_argument("addr")
    c.set_defaults(fn=probe_ping)
    c = client("raw")
    c.add_argument("src")
    c.add_argument("addr")
    c.add_argument("port", type=int)
    c.add_argument("--count", type=int, default=1)
    c.set_defaults(fn=probe_raw)
    c = client("traffic")
    c.add_argument("--target", action="append", required=True, metavar="KIND,ADDR,PORT",
                   help="KIND: udp (echo), tcp (new connections), stream (one connection), dns")
    c.add_argument("--interval", type=float, default=0.02)
    c.add_argument("--duration", type=float, default=0.0)
    c.add_argument("--ready")
    c.set_defaults(fn=traffic)

    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
