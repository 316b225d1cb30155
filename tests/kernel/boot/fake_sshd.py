#!/usr/bin/python3
"""A stand-in for sshd on tcp/22: answers every connection with one line and closes."""
import socket

srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", 22))
srv.listen(16)
print("fake-sshd: listening on tcp/22", flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        try:
            conn.sendall(b"SSH-2.0-ksbpf-boot-test\r\n")
        except OSError:
            pass
