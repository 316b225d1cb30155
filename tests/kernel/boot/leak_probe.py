#!/usr/bin/python3
"""Sends UDP, TCP and ICMP to the ISP side over IPv4 and IPv6 from early boot on, forever.

Run by leak-probe.service (After=network-pre.target): every packet it gets out must be
stopped by ksbpf, so the ISP side counts none. It records when it first sent and how many
rounds it made in /run/leak-probe.json, for the boot test.
"""
import json
import os
import socket
import sys
import time

TARGETS = sys.argv[1:] or ["100.64.0.1", "fd00:64::1"]
UDP_PORTS = (53, 123, 9999, 51820)
TCP_PORTS = (22, 80, 443)
STATE = "/run/leak-probe.json"


def icmp_echo(family: int, seq: int) -> bytes:
    kind = 8 if family == socket.AF_INET else 128  # echo request (v6: the kernel sums it)
    head = bytes([kind, 0, 0, 0]) + (0x6b73).to_bytes(2, "big") + (seq & 0xFFFF).to_bytes(2, "big")
    payload = b"ksbpf-leak-probe"
    if family == socket.AF_INET6:
        return head + payload
    data = head + payload
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = (~total) & 0xFFFF
    return data[:2] + csum.to_bytes(2, "big") + data[4:]


def udp(family: int, target: str, port: int, seq: int) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(b"leak?", (target, port))


def tcp(family: int, target: str, port: int, seq: int) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            s.connect((target, port))
        except BlockingIOError:
            time.sleep(0.01)  # the SYN is on its way (or dropped)


def icmp(family: int, target: str, port: int, seq: int) -> None:
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        s.sendto(icmp_echo(family, seq), (target, 0))


SENDS = [(udp, p) for p in UDP_PORTS] + [(tcp, p) for p in TCP_PORTS] + [(icmp, 0)]


def round_(seq: int, errors: dict) -> None:
    for target in TARGETS:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        for send, port in SENDS:
            try:
                send(family, target, port, seq)
            except OSError as e:
                what = f"{send.__name__}{6 if family == socket.AF_INET6 else 4}: {os.strerror(e.errno) if e.errno else e}"
                errors[what] = errors.get(what, 0) + 1


def notify_ready() -> None:
    """sd_notify READY=1 (without python3-systemd: the root may not have it yet)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", path)


def main() -> None:
    first = time.monotonic()
    print(f"leak-probe: first round at monotonic {first:.6f}", flush=True)
    errors: dict = {}
    seq = 0
    while True:
        round_(seq, errors)
        seq += 1
        if seq == 1:
            notify_ready()
        tmp = STATE + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"first_monotonic": first, "rounds": seq, "last_monotonic": time.monotonic(),
                       "errors": errors}, f)
        os.replace(tmp, STATE)
        time.sleep(0.2)


if __name__ == "__main__":
    main()
