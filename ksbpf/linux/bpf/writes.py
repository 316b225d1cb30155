"""Writing a Step into a generation's maps: tagged key sets, rule sets, in-place deltas,
one-cgroup replacements, sweeps; and cgroup paths resolved to ids."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from ksbpf.errors import KsbpfError
from ksbpf.linux.bpf.generations import Generation
from ksbpf.linux.bpf.kernel import BpfMap
from ksbpf.linux.bpf.layout import CGROUP_KEY_FMT, GEN_MAPS, TUNNEL_INDEX, TUNNEL_KEY_FMT
from ksbpf.linux.bpf.plan import Config, Held, Step, Version, normalized_cgroup
from ksbpf.linux.cgroup import cgroup2_mount
from ksbpf.render.bpf import (
    BpfPlan,
    CgroupEntry,
    CgroupWant,
    cgroup_key,
    key_tag,
    lan_keys,
    rule_keys,
    rule_set_of,
    tagged,
)


@contextmanager
def open_maps(gen: Generation) -> Iterator[dict[str, BpfMap]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(gen.map(name)) for name in GEN_MAPS}


def tunnel_masks(maps: Mapping[str, BpfMap]) -> dict[int, int]:
    """ifindex -> bank bits, for every ifindex with a bit set."""
    out: dict[int, int] = {}
    for k, v in maps["ks_tunnels"].items():
        if v[0]:
            out[struct.unpack("<I", k)[0]] = v[0]
    for k in maps["ks_tunnels_big"].keys():
        ifindex, bank = struct.unpack(TUNNEL_KEY_FMT, k)
        out[ifindex] = out.get(ifindex, 0) | 1 << bank
    return out


def tunnels_of(masks: Mapping[int, int], bank: int) -> frozenset[int]:
    return frozenset(i for i, m in masks.items() if m >> bank & 1)


def write_tunnels(maps: Mapping[str, BpfMap], masks: Mapping[int, int], bank: int, wanted: frozenset[int]) -> None:
    """Make tunnel bank `bank` hold exactly `wanted`; the other bank stays."""
    bit = 1 << bank
    small: dict[bytes, bytes] = {}
    add: list[bytes] = []
    drop: list[bytes] = []
    for i in sorted(set(masks) | wanted):
        old = masks.get(i, 0)
        new = (old & ~bit) | (bit if i in wanted else 0)
        if new == old:
            continue
        if i < TUNNEL_INDEX:
            small[struct.pack("<I", i)] = bytes([new])  # one byte: a packet sees it old or new
        else:
            (add if new & bit else drop).append(struct.pack(TUNNEL_KEY_FMT, i, bank))
    maps["ks_tunnels"].update_many(small)
    maps["ks_tunnels_big"].update_many(dict.fromkeys(add, b"\1"))
    maps["ks_tunnels_big"].delete_many(drop)


# ks_cgroups bookkeeping, looked up by no program (cgroup ids start at 1 and the ancestor
# walks stop at id 0): its `rules` is the first rule set id that no write has used yet. A
# write raises it before it writes rules under new ids, so ids a write that died used (and
# whose keys it left) are never handed out again; only a versioned write sweeps those keys.
RESERVE_KEY = struct.pack(CGROUP_KEY_FMT, 0, 0, 0)


@dataclass
class MapsRead:
    """A generation's policy maps as read at the start of a write."""

    endpoint_keys: list[bytes] | None = None
    dns_keys: list[bytes] | None = None
    cgroup_items: dict[bytes, bytes] | None = None

    def held(self, live: Config | None) -> Held:
        if live is None:
            return Held()
        cgroups = None
        reserved = 0
        if self.cgroup_items is not None:
            tag = struct.pack("<I", live.cgroups_tag)
            cgroups = {int.from_bytes(k[:8], "little"): v for k, v in self.cgroup_items.items() if k[8:12] == tag}
            if RESERVE_KEY in self.cgroup_items:
                reserved = CgroupEntry.unpack(self.cgroup_items[RESERVE_KEY]).rules
        return Held(
            endpoints=None if self.endpoint_keys is None else
            frozenset(k[4:] for k in self.endpoint_keys if key_tag(k) == live.endpoints_tag),
            dns=None if self.dns_keys is None else frozenset(k[4:] for k in self.dns_keys if key_tag(k) == live.dns_tag),
            cgroups=cgroups,
            reserved_rules=reserved,
        )


def read_maps(maps: Mapping[str, BpfMap], want: Version, live: Config | None) -> MapsRead:
    """Batched reads (a few syscalls for tens of thousands of entries) of what `want` sets."""
    if live is None:
        return MapsRead()
    return MapsRead(
        endpoint_keys=maps["ks_endpoints"].keys() if want.endpoints is not None else None,
        dns_keys=maps["ks_dns"].keys() if want.dns is not None else None,
        cgroup_items=dict(maps["ks_cgroups"].items()) if want.cgroups is not None or want.lan is not None else None,
    )


def write_tagged(m: BpfMap, keys: Iterable[bytes], tag: int, live_tag: int | None,
                  existing: list[bytes] | None = None) -> list[tuple[BpfMap, list[bytes]]]:
    """Write `keys` under `tag` beside the live version's (`live_tag`); returns what to
    delete once the new version is live. `existing`: the map's keys, if read already."""
    if existing is None:
        existing = m.keys() if live_tag is not None else []
    m.delete_many([k for k in existing if key_tag(k) != live_tag])  # left by a write that died
    m.update_many({tagged(tag, k): b"\1" for k in keys})
    return [(m, [k for k in existing if key_tag(k) == live_tag])]


def write_rules(maps: Mapping[str, BpfMap], step: Step, want: Version, old: Config | None,
                 entries: dict[bytes, bytes] | None = None) -> list[tuple[BpfMap, list[bytes]]]:
    """LAN and exemption rules of the next version under their new rule set ids and, when
    exemptions changed, its ks_cgroups entries under its tag. Returns what to delete once
    the new version is live. `entries`: ks_cgroups as read already."""
    cfg = step.config
    cgm, ports, nets = maps["ks_cgroups"], maps["ks_ports"], maps["ks_nets"]
    if entries is None:
        entries = dict(cgm.items()) if old is not None else {}
    entries = {k: v for k, v in entries.items() if k != RESERVE_KEY}
    live_rules: set[int] = set()
    if old is not None:
        live_rules = {old.lan_rules} | {CgroupEntry.unpack(v).rules for k, v in entries.items()
                                        if struct.unpack(CGROUP_KEY_FMT, k)[1] == old.cgroups_tag}
    existing = {"ports": ports.keys() if old else [], "nets": nets.keys() if old else []}
    for m, keys in ((ports, existing["ports"]), (nets, existing["nets"])):
        m.delete_many([k for k in keys if rule_set_of(k) not in live_rules])  # left by a write that died
    if old is not None:
        cgm.update(RESERVE_KEY, CgroupEntry(cfg.next_rules).pack())

    new_ports: dict[bytes, bytes] = {}
    new_nets: dict[bytes, bytes] = {}
    if "lan" in step.changed and cfg.lan_rules:
        assert want.lan is not None
        new_nets.update(dict.fromkeys(lan_keys(want.lan, cfg.lan_rules), b"\1"))
    cleanup: list[tuple[BpfMap, list[bytes]]] = []
    new_rules = {cfg.lan_rules}
    if "cgroups" in step.changed:
        assert want.cgroups is not None
        live_tag = old.cgroups_tag if old else None
        cgm.delete_many([k for k in entries if struct.unpack(CGROUP_KEY_FMT, k)[1] != live_tag])
        new_entries: dict[bytes, bytes] = {}
        for cid, w in want.cgroups.items():
            rule_set = step.exemption_rules.get(cid, 0)
            if w.rules is not None:
                p, n = rule_keys(w.rules, rule_set)
                new_ports.update(dict.fromkeys(p, b"\1"))
                new_nets.update(dict.fromkeys(n, b"\1"))
            new_entries[cgroup_key(cid, cfg.cgroups_tag)] = w.entry(rule_set).pack()
        new_rules |= set(step.exemption_rules.values())
        ports.update_many(new_ports)
        nets.update_many(new_nets)
        cgm.update_many(new_entries)
        cleanup.append((cgm, [k for k in entries if struct.unpack(CGROUP_KEY_FMT, k)[1] == live_tag]))
    else:
        if old is not None:
            new_rules |= live_rules - {old.lan_rules}
        nets.update_many(new_nets)
    for m, keys in ((ports, existing["ports"]), (nets, existing["nets"])):
        cleanup.append((m, [k for k in keys if rule_set_of(k) in live_rules and rule_set_of(k) not in new_rules]))
    return cleanup


_DELTA_MAPS = {"endpoints": ("ks_endpoints", "endpoints_tag"), "dns": ("ks_dns", "dns_tag")}


def write_delta(maps: Mapping[str, BpfMap], step: Step, read: MapsRead, slot: int) -> None:
    """StepPath.DELTA: add and delete endpoint and DNS keys in place under the live tags, then
    rewrite the live config slot (bookkeeping only). Deleted keys go at once: a packet that
    finds one missing is judged by the new set. On failure what was done is undone (best
    effort; the next write compares with the maps again) and the error raised."""
    undo: list[tuple[BpfMap, list[bytes], list[bytes]]] = []  # (map, added, deleted)
    try:
        for part, (add, remove) in step.delta.items():
            name, tag_field = _DELTA_MAPS[part]
            m, tag = maps[name], getattr(step.config, tag_field)
            existing = read.endpoint_keys if part == "endpoints" else read.dns_keys
            m.delete_many([k for k in existing or () if key_tag(k) != tag])  # left by a write that died
            added, deleted = [tagged(tag, k) for k in add], [tagged(tag, k) for k in remove]
            undo.append((m, added, deleted))
            m.delete_many(deleted)
            m.update_many(dict.fromkeys(added, b"\1"))
        maps["ks_config"].update(struct.pack("<I", slot), step.config.pack())
    except OSError:
        for m, added, deleted in reversed(undo):
            try:
                m.delete_many(added)
                m.update_many(dict.fromkeys(deleted, b"\1"))
            except OSError:
                pass
        raise


def write_one_cgroup(maps: Mapping[str, BpfMap], step: Step, want: Version, held: Held, read: MapsRead,
                      slot: int, hint: CgroupWant | None) -> tuple[list[tuple[BpfMap, list[bytes]]], frozenset[int]]:
    """StepPath.ONE_CGROUP: the one exemption's rules under a fresh rule set id (referenced by
    nothing yet), then its ks_cgroups element replaced, inserted or deleted under the live
    tag (one atomic element update), then the live config slot rewritten (bookkeeping only).
    Returns what to delete after a grace period: the old rule set's keys when `hint` (what
    the last write of this process wanted for that cgroup) is verifiably what the map holds,
    else the old rule set id, whose keys a sweep of ks_ports and ks_nets finds."""
    assert want.cgroups is not None and held.cgroups is not None and step.cgroup is not None
    cfg, cid = step.config, step.cgroup
    cgm, ports, nets = maps["ks_cgroups"], maps["ks_ports"], maps["ks_nets"]
    w, raw = want.cgroups.get(cid), held.cgroups.get(cid)
    old = CgroupEntry.unpack(raw) if raw is not None else None
    key = cgroup_key(cid, cfg.cgroups_tag)
    cgm.delete_many([k for k in read.cgroup_items or {}  # left by a write that died
                     if k != RESERVE_KEY and struct.unpack(CGROUP_KEY_FMT, k)[1] != cfg.cgroups_tag])
    rule_set = step.exemption_rules.get(cid, 0)
    fresh = w is not None and w.rules is not None and (old is None or rule_set != old.rules)
    new_ports: list[bytes] = []
    new_nets: list[bytes] = []
    touched = False
    try:
        if fresh:
            assert w is not None and w.rules is not None
            cgm.update(RESERVE_KEY, CgroupEntry(cfg.next_rules).pack())
            new_ports, new_nets = rule_keys(w.rules, rule_set)
            ports.update_many(dict.fromkeys(new_ports, b"\1"))
            nets.update_many(dict.fromkeys(new_nets, b"\1"))
        touched = True
        if w is None:
            cgm.delete(key)
        else:
            cgm.update(key, w.entry(rule_set).pack())
        maps["ks_config"].update(struct.pack("<I", slot), cfg.pack())
    except OSError:
        try:
            if touched:
                if old is None:
                    cgm.delete(key)
                else:
                    cgm.update(key, old.pack())
            ports.delete_many(new_ports)
            nets.delete_many(new_nets)
        except OSError:
            pass
        raise
    if old is None or not old.rules or (w is not None and old.rules == rule_set):
        return [], frozenset()
    if hint is not None and hint.rules is not None and hint.written_as(raw):
        p, n = rule_keys(hint.rules, old.rules)
        return [(ports, p), (nets, n)], frozenset()
    return [], frozenset({old.rules})


def sweep_rule_sets(maps: Mapping[str, BpfMap], rule_sets: frozenset[int]) -> None:
    """Delete every ks_ports and ks_nets key of these rule sets."""
    for name in ("ks_ports", "ks_nets"):
        m = maps[name]
        m.delete_many([k for k in m.keys() if rule_set_of(k) in rule_sets])


def resolve_cgroups(plan: BpfPlan) -> dict[str, int | None]:
    """Exempt and endpoint cgroup paths -> their ids now (None: not there)."""
    return resolve_paths([e.cgroup for e in plan.exemptions] + list(plan.endpoint_cgroups))


def resolve_paths(paths: list[str]) -> dict[str, int | None]:
    """Cgroup paths -> their ids now (None: not there). A directory holding many of them
    is read once (its entries carry their inode numbers, which are the cgroup ids), the
    others are one stat each."""
    try:
        root = str(cgroup2_mount().resolve())
    except (KsbpfError, OSError):
        return dict.fromkeys(paths)
    out: dict[str, int | None] = {}
    by_parent: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        if path in out:
            continue
        out[path] = None
        rel = normalized_cgroup(path)
        if rel is None:
            continue
        parent, _, name = rel.rpartition("/")
        by_parent.setdefault(parent if name else "\0root", []).append((path, name))
    for parent, children in by_parent.items():
        where = root if parent in ("", "\0root") else f"{root}/{parent}"
        if len(children) >= 16:
            try:
                with os.scandir(where) as it:
                    found = {e.name: e for e in it}
            except OSError:
                found = {}
            for path, name in children:
                e = found.get(name)
                if e is not None and e.is_dir(follow_symlinks=False):
                    out[path] = e.inode()
            continue
        # One stat, not cgroup_dir's realpath: a normalized path has no '..', and cgroupfs
        # has no symlinks, so the join cannot leave the mount.
        for path, name in children:
            try:
                st = os.stat(f"{where}/{name}" if name else where)
                out[path] = st.st_ino if stat.S_ISDIR(st.st_mode) else None
            except OSError:
                pass
    return out
