"""What the kernel holds now, as the reconciler compares it with the policy: the ksbpf
nftables tables (with the generation they were read at), the links split by the
policy's tunnel patterns, and the exempt cgroups' directories and ids. Called inside
the namespace (the reconciler enters it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksbpf.errors import KsbpfError
from ksbpf.linux.cgroup import cgroup2_mount, cgroup_dir, cgroup_id
from ksbpf.linux.nftgen import nft_generation
from ksbpf.policy import Policy
from ksbpf.render.nft import INET, NETDEV, TABLE
from ksbpf.verdict import interface_matches

IFF_UP = 0x1


def nft_listing() -> list[dict[str, Any]] | None:
    """Both ksbpf tables as JSON objects (handles included); None when `table inet ksbpf`
    is missing. Called inside the namespace."""
    import nftables

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(True)
    objects: list[dict[str, Any]] = []
    for fam in (INET, NETDEV):
        rc, out, _err = nft.cmd(f"list table {fam} {TABLE}")
        if rc != 0 or not out:
            if fam == INET:
                return None
            continue
        objects += [o for o in json.loads(out).get("nftables", []) if "metainfo" not in o]
    return objects


def nft_listing_at_generation(tries: int = 3) -> tuple[int | None, list[dict[str, Any]] | None]:
    """nft_listing() and the nftables generation it shows (None when the ruleset kept
    changing while it was read, or the kernel did not say). Called inside the namespace."""
    listing = None
    for _ in range(tries):
        before = nft_generation()
        listing = nft_listing()
        if before is not None and nft_generation() == before:
            return before, listing
    return None, listing


def cgroup_mount() -> Path | None:
    try:
        return cgroup2_mount().resolve()
    except (KsbpfError, OSError):
        return None


def resolve_cgroup(path: str, mount: Path | None) -> tuple[Path | None, int | None]:
    """A policy cgroup path -> (its directory or None if it cannot be one, its id or None
    if it is not there now)."""
    if mount is None:
        return None, None
    try:
        d = cgroup_dir(path, mount)
    except KsbpfError:
        return None, None
    try:
        return d, cgroup_id(d)
    except OSError:
        return d, None


@dataclass
class LinkState:
    tunnels: dict[int, tuple[str, bool]]  # ifindex -> (name, up)
    uplinks: dict[int, str]  # ifindex -> name (neither loopback nor tunnel)


def read_links(policy: Policy) -> LinkState:
    """Links of the current namespace, split by the policy's tunnel patterns."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = [(m["index"], m.get_attr("IFLA_IFNAME"), bool(m["flags"] & IFF_UP)) for m in ipr.get_links()]
    tunnels = {i: (n, up) for i, n, up in links if interface_matches(n, policy.tunnel.interfaces)}
    uplinks = {i: n for i, n, _ in links if n != "lo" and i not in tunnels}
    return LinkState(tunnels, uplinks)


def cgroup_id_or_none(d: Path | None) -> int | None:
    if d is None:
        return None
    try:
        return cgroup_id(d)
    except OSError:
        return None
