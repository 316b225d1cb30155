"""Names and layouts the programs and this package share: map, pin and program names,
struct formats and limits, each mirroring bpf/killswitch.h. Constants only."""

from __future__ import annotations

import re

from ksbpf.verdict import DROP_REASONS, Reason

SOURCE = "killswitch.c"

PROGS = {"egress": "ks_egress", "sock_create": "ks_sock_create"}
GEN_MAPS = ("ks_active", "ks_config", "ks_tunnels", "ks_tunnels_big", "ks_endpoints", "ks_dns", "ks_cgroups",
            "ks_ports", "ks_nets")
DROPS_PIN = "drops"
SK_NETNS_PIN = "sk_netns"  # before owner records: unpinned when found
OWNERS_PIN = "owners"
EVENTS_PIN = "events"
EVENTS_LOST_PIN = "events_lost"
EVENTS_RATE_PIN = "events_rate"
NFT_EVENTS_LINK = "nft_events"  # in a generation's directory: the kfree_skb program's bpf_link
NFT_EVENTS_PROG = "ks_kfree_skb"
EVENTS_FLUSH_PIN = "events_flush"  # in a generation's directory: run by ksbpfd, never attached
EVENTS_FLUSH_PROG = "ks_events_flush"
RATE_KEY_FMT = "<QII"  # struct ks_rate_key
RATE_FMT = "<QQII16sBBHI16s"  # struct ks_rate

# Drop events (ksbpf.linux.events reads them).
EVENTS_BYTES = 256 * 1024  # ~4000 events: one second of every key's allowance on a busy host
EVENTS_PER_SEC = 8  # per (cgroup, reason, layer); the rest ride on the next event's count
EVENTS_RATE_KEYS = 4096
OWNER_FMT = "<QQII16s"
EVENT_FMT = "<QQII16sBBBBHH16s"

MAX_CGROUP_DEPTH = 31
MAX_DROP_KEYS = 4096

# What one policy may hold (check_capacity). Maps of policy are twice this: during an
# update they hold the live version and the next one.
MAX_ENDPOINTS = 65536
MIN_ENDPOINT_TIER = 1024
MAX_DNS = 256
MAX_CGROUPS = 32768  # exempt and endpoint cgroups
MAX_RULES = 131072  # LPM keys of exemptions (and LAN), each of ks_ports and ks_nets
TUNNEL_INDEX = 4096  # ifindexes below it are looked up in an array (inlined), the rest hashed
MAX_BIG_TUNNELS = 1024

# Map layouts of bpf/killswitch.h.
CONFIG_FMT = "<QQQIIIIIIIIB7x4Q32s64s"
LEGACY_CONFIG_FMT = "<QQQII64s"  # before policy versions
CGROUP_KEY_FMT = "<QII"
CGROUP_FMT = "<IIII"
TUNNEL_KEY_FMT = "<II"
DROP_KEY_FMT = "<IIQ"
DROP_VAL_FMT = "<QQ"
F_IPV6_BLOCK, F_ENDPOINT_MARK, F_ENDPOINT_CGROUPS = 0x1, 0x2, 0x4
KIND_ALLOW, KIND_LISTEN = 0, 1
PORT_PREFIX_BASE = NET_PREFIX_BASE = 40
IPPROTO = {"tcp": 6, "udp": 17}

REASON_NUMBERS: dict[Reason, int] = {r: i for i, r in enumerate(DROP_REASONS)}

INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def instance_name(netns_name: str | None) -> str:
    """The instance a ksbpf engine uses for a netns: one per netns, so concurrent engines
    (the host's, a lab's, a test's) keep apart pins and programs."""
    return "host" if netns_name is None else f"netns-{netns_name}"
