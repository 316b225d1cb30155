"""Pure: the bytes the audit's probes carry (a DNS query, an ICMP echo request, a raw
Ethernet frame with its IPv4/IPv6 and UDP headers) and the address they go to."""

from __future__ import annotations

import ipaddress
import socket
import struct

from ksbpf.audit.plan import Probe


def dns_query(qid: int) -> bytes:
    """A query for ksbpf-audit.invalid. A (id `qid`): any answer at all means it got out."""
    name = b"".join(bytes([len(label)]) + label for label in (b"ksbpf-audit", b"invalid")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def raw_frame(p: Probe) -> bytes:
    """A broadcast Ethernet frame carrying a UDP datagram to the probe's address and port."""
    payload = b"ksbpf-audit"
    src_mac = bytes.fromhex(p.src_mac.replace(":", "")) if p.src_mac else b"\x02\0\0\0\0\x01"
    if p.family == 4:
        udp = struct.pack("!HHHH", 40000, p.port, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         socket.inet_aton(p.src), socket.inet_aton(p.addr))
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        src, dst = socket.inet_pton(socket.AF_INET6, p.src), socket.inet_pton(socket.AF_INET6, p.addr)
        udp = struct.pack("!HHHH", 40000, p.port, 8 + len(payload), 0) + payload
        pseudo = src + dst + struct.pack("!IxxxB", len(udp), 17)
        udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
        ip = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + src + dst
        ethertype = 0x86DD
    return b"\xff" * 6 + src_mac + struct.pack("!H", ethertype) + ip + udp


def icmp_echo(family: int, ident: int) -> bytes:
    typ = 8 if family == 4 else 128
    body = struct.pack("!BBHHH", typ, 0, 0, ident, 1) + b"ksbpf-audit"
    if family == 4:
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return body  # the kernel fills in the ICMPv6 checksum


def sockaddr(p: Probe, port: int | None = None) -> tuple[str, int] | tuple[str, int, int, int]:
    """The probe's destination as socket calls take it (a link-local IPv6 one scoped to its interface)."""
    port = p.port if port is None else port
    if p.family == 6:
        scope = p.ifindex if ipaddress.ip_address(p.addr).is_link_local else 0
        return (p.addr, port, 0, scope)
    return (p.addr, port)
