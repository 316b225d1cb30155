#!/usr/bin/python3
"""Sends a UDP datagram to the ISP's port 5555 every 0.2 s, each from a new socket (an
exemption marks sockets when they are created). Blocked until `ksctl exempt` lets this
unit's cgroup reach udp/5555; then the ISP side counts them."""
import socket
import sys
import time

target = sys.argv[1] if len(sys.argv) > 1 else "100.64.0.1"
sent = refused = 0
while True:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"exempt", (target, 5555))
        sent += 1
    except OSError:
        refused += 1
    if (sent + refused) % 50 == 1:
        print(f"exempt-probe: {sent} sent, {refused} refused", flush=True)
    time.sleep(0.2)
