"""Packet marks and routing identifiers ksbpf owns. One place, so that the nftables,
routing and BPF layers agree bit for bit."""

from __future__ import annotations

import zlib

# Sockets of an exempt cgroup are marked at creation (cgroup/sock_create BPF) with
# EXEMPT_MARK_BASE | exemption id, so nftables and routing can tell them apart without
# cgroup matching (nft 1.0.6 cannot match cgroup2 reliably).
EXEMPT_MARK_BASE = 0x4B000000
EXEMPT_MARK_MASK = 0xFF000000
EXEMPT_ID_MASK = 0x00FFFFFF

# Used as the endpoint mark when a policy names endpoint_cgroups but no endpoint_mark:
# the sock_create program then marks the endpoint cgroups' sockets with it.
DEFAULT_ENDPOINT_MARK = 0x6B736570

# Routing table for everything that is not exempt and not the tunnel client's own traffic.
ROUTE_TABLE = 0x4B53
# ip rule priorities: before wg-quick's (32764/32765) and main (32766).
RULE_PRIORITY_BASE = 10000


def is_exempt_mark(mark: int) -> bool:
    return mark & EXEMPT_MARK_MASK == EXEMPT_MARK_BASE


def exemption_ids(cgroups: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Stable 24-bit ids per exempt cgroup path: a socket marked yesterday keeps meaning
    the same exemption after others are added. Collisions probe upward in sorted order."""
    ids: dict[str, int] = {}
    used: set[int] = set()
    for cg in sorted(cgroups):
        i = (zlib.crc32(cg.encode()) & EXEMPT_ID_MASK) or 1
        while i in used:
            i = (i % EXEMPT_ID_MASK) + 1
        used.add(i)
        ids[cg] = i
    return ids


def exempt_mark(exemption_id: int) -> int:
    return EXEMPT_MARK_BASE | exemption_id
