"""The lab's plan: names, addresses, ports and marks, and the host paths it uses.
Pure constants, read by the topology, the rulesets, the probes and the tests."""

from __future__ import annotations

from pathlib import Path

STATE_DIR = Path("/run/ksbpf/lab")
WG_RUN_DIR = Path("/var/run/wireguard")
CGROUP_PREFIX = "ksbpf-lab-"
DEFAULT_LAB = "ksbpf"

UPLINK = "uplink"
SERVER_V4, CLIENT_V4, OUTSIDE_DNS_V4 = "192.0.2.1", "192.0.2.2", "192.0.2.53"
SERVER_V6, CLIENT_V6, OUTSIDE_DNS_V6 = "2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::53"
TUN_SERVER_V4, TUN_CLIENT_V4 = "10.64.0.1", "10.64.0.2"
TUN_SERVER_V6, TUN_CLIENT_V6 = "fd00:64::1", "fd00:64::2"
TUN_NET_V4, TUN_NET_V6 = "10.64.0.0/24", "fd00:64::/64"
TARGET_V4, TARGET_GW_V4 = "198.51.100.10", "198.51.100.1"
TARGET_V6, TARGET_GW_V6 = "2001:db8:2::10", "2001:db8:2::1"
ROUTED_V4, ROUTED_GW_V4, ROUTED_NET_V4 = "10.99.0.2", "10.99.0.1", "10.99.0.0/24"
ROUTED_V6, ROUTED_GW_V6, ROUTED_NET_V6 = "fd00:99::2", "fd00:99::1", "fd00:99::/64"

ENDPOINT_PORT = 51820
CLIENT_WG_PORT = 51821
ENDPOINT = f"{SERVER_V4}:{ENDPOINT_PORT}/udp"
WG_FWMARK = 0xCA6C
WG_TABLE = 51820
ECHO_PORT = 7
WHOAMI_PORT = 8
# TCP and UDP echo on the server's uplink addresses: "any other port on the VPN server".
SERVER_PORTS = (22, 80, 443, 8080)
# Who answered a DNS query shows in the answer.
DNS_TUNNEL_A, DNS_TUNNEL_AAAA = TARGET_V4, TARGET_V6
DNS_OUTSIDE_A, DNS_OUTSIDE_AAAA = "192.0.2.66", "2001:db8:1::66"

COUNTER_TABLE = "ksbpflab"
