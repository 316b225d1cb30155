"""Policy versions, planned without the kernel: the ks_config header (Config), what a
version holds (Version) and what the maps hold (Held), how to go from one to the other
(Step, plan_step), and run-time exemption changes (ExemptionIndex, select_change). Pure."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ksbpf import marks
from ksbpf.linux.bpf.layout import CONFIG_FMT, MAX_CGROUPS
from ksbpf.marks import exempt_mark
from ksbpf.policy import Exemption, IPNetwork, Policy, normalize_cgroup
from ksbpf.render.bpf import BpfPlan, CgroupEntry, CgroupWant, ExemptionRules, net_key, rules_for


@dataclass(frozen=True)
class Config:
    """struct ks_config: one policy version, and the loader's bookkeeping about it."""

    netns_cookie: int
    generation: int
    cgroup_id: int
    flags: int
    endpoint_mark: int
    instance: str
    version: int = 0
    endpoints_tag: int = 0
    dns_tag: int = 0
    cgroups_tag: int = 0
    lan_rules: int = 0
    next_rules: int = 1
    tunnel_bank: int = 0
    digests: tuple[int, int, int, int] = (0, 0, 0, 0)  # as DIGESTS
    build: bytes = b"\0" * 32

    def pack(self) -> bytes:
        return struct.pack(CONFIG_FMT, self.netns_cookie, self.generation, self.cgroup_id, self.flags,
                           self.endpoint_mark, self.version, self.endpoints_tag, self.dns_tag, self.cgroups_tag,
                           self.lan_rules, self.next_rules, self.tunnel_bank, *self.digests, self.build,
                           self.instance.encode())

    @classmethod
    def unpack(cls, raw: bytes) -> Config:
        (c, g, cg, fl, m, ver, etag, dtag, ctag, lan, nxt, tbank, d0, d1, d2, d3, build,
         inst) = struct.unpack_from(CONFIG_FMT, raw)
        return cls(c, g, cg, fl, m, inst.split(b"\0", 1)[0].decode(errors="replace"), ver, etag, dtag, ctag, lan,
                   nxt, tbank, (d0, d1, d2, d3), build)


def cgroup_wants(plan: BpfPlan, ids: Mapping[str, int | None]) -> dict[int, CgroupWant]:
    """ks_cgroups entries of a plan, by the cgroup ids its paths resolved to (None: not there)."""
    out: dict[int, CgroupWant] = {}
    for rules in plan.exemptions:
        cid = ids.get(rules.cgroup)
        if cid is not None:
            out[cid] = rules.want
    for path in plan.endpoint_cgroups:
        cid = ids.get(path)
        if cid is None:
            continue
        e = out.get(cid, CgroupWant(None, 0, False))
        # One cgroup both exempt and endpoint: the endpoint mark wins, the VPN needs it.
        out[cid] = CgroupWant(e.rules, plan.endpoint_cgroup_mark or e.mark, True)
    return out


def cgroups_changed(held: Mapping[int, bytes], want: Mapping[int, CgroupWant]) -> list[int]:
    """Cgroup ids whose ks_cgroups entry (`held`: packed values) must change (added,
    removed or different), sorted."""
    out = [cid for cid, w in want.items() if not w.written_as(held.get(cid))]
    out += [cid for cid in held if cid not in want]
    return sorted(out)


def _digest(items: Iterable[bytes]) -> int:
    """Of a set of byte strings, as 64 bits."""
    data = b"".join(len(item).to_bytes(4, "little") + item for item in sorted(set(items)))
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


DIGESTS = ("endpoints", "dns", "lan", "cgroups")
_M64 = (1 << 64) - 1


def cgroup_term(cid: int, w: CgroupWant) -> int:
    """One entry's share of the cgroups digest (Version.digest), less its count of one."""
    return (cid * 0x9E3779B97F4A7C15 & _M64) ^ w.mix


def cgroups_digest_changed(digest: int, cid: int, old: CgroupWant | None, new: CgroupWant | None) -> int:
    """The cgroups digest of a version after one entry changed from `old` to `new` (None: absent)."""
    if old is not None:
        digest -= 1 + cgroup_term(cid, old)
    if new is not None:
        digest += 1 + cgroup_term(cid, new)
    return digest & _M64


@dataclass(frozen=True)
class Version:
    """A policy version as the maps should hold it, before tags, rule set ids and banks are
    chosen. A part left None is kept as the live version has it. Pure."""

    header: Config | None = None  # its cookie, generation, cgroup, flags, mark, build, instance
    endpoints: tuple[bytes, ...] | None = None
    dns: tuple[bytes, ...] | None = None
    lan: tuple[IPNetwork, ...] | None = None
    cgroups: Mapping[int, CgroupWant] | None = None
    tunnels: frozenset[int] | None = None

    def digest(self, part: str) -> int | None:
        if part == "endpoints" and self.endpoints is not None:
            return _digest(self.endpoints)
        if part == "dns" and self.dns is not None:
            return _digest(self.dns)
        if part == "lan" and self.lan is not None:
            return _digest(net_key(0, n) for n in self.lan)
        if part == "cgroups" and self.cgroups is not None:
            # A sum of per-entry mixes: cheap for tens of thousands of exemptions whose mixes
            # are kept (ExemptionRules.want). Which entries changed is decided against the
            # map itself (cgroups_changed); this is bookkeeping.
            total = len(self.cgroups)
            for cid, w in self.cgroups.items():
                total += cgroup_term(cid, w)
            return total & _M64
        return None


@dataclass(frozen=True)
class Held:
    """What a generation's maps hold under the live version's tags, as read back from the
    kernel (None: not read). In-place updates are computed against this, not against a
    memory of what was written, so they also repair entries deleted behind our back."""

    endpoints: frozenset[bytes] | None = None  # untagged endpoint_key()s
    dns: frozenset[bytes] | None = None  # untagged addr_key()s
    cgroups: Mapping[int, bytes] | None = None  # cgroup id -> packed CgroupEntry
    reserved_rules: int = 0  # the ks_cgroups bookkeeping entry (RESERVE_KEY): no id below it is fresh


_HEADER_FIELDS = ("netns_cookie", "generation", "cgroup_id", "flags", "endpoint_mark", "build", "instance")


class StepPath(StrEnum):
    """How an update is written (Step.path). A str, so it prints and compares as the strings it
    replaced did."""

    NEW = "new"  # a new generation, everything written as its first version
    VERSIONED = "versioned"  # what changed written beside the live version, then ks_active flips
    DELTA = "delta"  # endpoint and DNS keys added and deleted in place under the live tags
    ONE_CGROUP = "one cgroup"  # one ks_cgroups entry replaced in place, its rules under a fresh id
    UNCHANGED = ""  # nothing to write (falsy, as the empty string it replaces)


@dataclass(frozen=True)
class Step:
    """One update of a generation's maps: the config to flip to and what to write first."""

    config: Config
    changed: tuple[str, ...]  # of "config", "tunnels", *DIGESTS
    exemption_rules: Mapping[int, int]  # cgroup id -> its new rule set id, when "cgroups" changed
    path: StepPath = StepPath.VERSIONED
    # StepPath.DELTA: part ("endpoints", "dns") -> (untagged keys to add, keys to delete)
    delta: Mapping[str, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = field(default_factory=dict)
    cgroup: int | None = None  # StepPath.ONE_CGROUP: the cgroup id whose entry changes

    def describe(self) -> tuple[str, ...]:
        """What was written and how, e.g. ("endpoints (delta +1 -0)",)."""
        if self.path == StepPath.DELTA:
            return tuple(f"{part} (delta +{len(a)} -{len(r)})" for part, (a, r) in self.delta.items())
        if self.path == StepPath.ONE_CGROUP:
            return (f"cgroups (one cgroup {self.cgroup})",)
        if self.path == StepPath.VERSIONED:
            return tuple(f"{part} (versioned)" for part in self.changed)
        return self.changed


def plan_step(live: Config | None, live_tunnels: frozenset[int], want: Version, held: Held | None = None) -> Step:
    """Decide an update from the live version (None: a new generation, nothing written yet),
    what the maps hold under its tags (`held`, where read) and the wanted version. Pure.

    A part differs when its digest does or, where held was read, when the maps do not hold
    it. How it is written:
    - StepPath.DELTA when only endpoint and/or DNS sets differ: each packet makes one lookup in
      one of those maps, so adding and deleting keys in place under the live tag judges it
      by the old set or the new, never a mix; the config keeps its tags.
    - StepPath.ONE_CGROUP when only ks_cgroups differs, in exactly one entry: a packet's ancestor
      walk sees that one entry old or new; its rules go under a fresh rule set id first.
    - StepPath.VERSIONED otherwise: parts that differ get the new version's tag, fresh rule set
      ids or the other tunnel bank; the rest is shared with the live version.
    The in-place paths change only bookkeeping in the config (version, digests, next_rules),
    which no program reads: the live slot is rewritten in place, with no flip."""
    if live is None:
        if want.header is None:
            raise ValueError("a new generation needs a whole version")
        base = replace(want.header, version=0, endpoints_tag=0, dns_tag=0, cgroups_tag=0, lan_rules=0,
                       next_rules=1, tunnel_bank=1, digests=(0, 0, 0, 0))
    else:
        base = live
    held = held or Held()
    version = base.version + 1
    cfg = replace(base, version=version)
    changed: list[str] = []
    if want.header is not None and live is not None:
        if any(getattr(want.header, f) != getattr(live, f) for f in _HEADER_FIELDS):
            changed.append("config")
    if want.header is not None:
        cfg = replace(cfg, **{f: getattr(want.header, f) for f in _HEADER_FIELDS})
    if want.tunnels is not None and (live is None or want.tunnels != live_tunnels):
        changed.append("tunnels")
        cfg = replace(cfg, tunnel_bank=1 - base.tunnel_bank)
    digests = list(base.digests)
    next_rules = max(base.next_rules, held.reserved_rules)
    wanted_sets = {"endpoints": want.endpoints, "dns": want.dns}
    held_sets = {"endpoints": held.endpoints, "dns": held.dns}
    delta: dict[str, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = {}
    cgroup_diff: list[int] | None = None
    for i, part in enumerate(DIGESTS):
        d = want.digest(part)
        if d is None:
            continue
        differs = live is None or d != live.digests[i]
        if live is not None and part in held_sets:
            keys, have = wanted_sets[part], held_sets[part]
            if keys is not None and have is not None:
                wanted = frozenset(keys)
                delta[part] = (tuple(sorted(wanted - have)), tuple(sorted(have - wanted)))
                differs = differs or wanted != have
        if live is not None and part == "cgroups" and held.cgroups is not None:
            assert want.cgroups is not None
            cgroup_diff = cgroups_changed(held.cgroups, want.cgroups)
            differs = differs or bool(cgroup_diff)
        if differs:
            changed.append(part)
            digests[i] = d

    in_place = live is not None and changed and "config" not in changed and "tunnels" not in changed
    if in_place and set(changed) <= {"endpoints", "dns"} and all(p in delta for p in changed):
        cfg = replace(cfg, digests=(digests[0], digests[1], digests[2], digests[3]))
        return Step(cfg, tuple(changed), {}, StepPath.DELTA, {p: delta[p] for p in changed})
    if in_place and changed == ["cgroups"] and cgroup_diff is not None and len(cgroup_diff) == 1:
        assert want.cgroups is not None and held.cgroups is not None
        (cid,) = cgroup_diff
        cfg = replace(cfg, digests=(digests[0], digests[1], digests[2], digests[3]))
        return one_cgroup_step(cfg, next_rules, cid, want.cgroups.get(cid), held.cgroups.get(cid))

    rules: dict[int, int] = {}
    for part in DIGESTS:
        if part not in changed:
            continue
        if part == "endpoints":
            cfg = replace(cfg, endpoints_tag=version)
        elif part == "dns":
            cfg = replace(cfg, dns_tag=version)
        elif part == "lan":
            lan_rules = 0
            if want.lan:
                lan_rules, next_rules = next_rules, next_rules + 1
            cfg = replace(cfg, lan_rules=lan_rules)
        else:
            assert want.cgroups is not None
            for cid, w in sorted(want.cgroups.items()):
                if w.rules is not None:
                    rules[cid], next_rules = next_rules, next_rules + 1
            cfg = replace(cfg, cgroups_tag=version)
    cfg = replace(cfg, digests=(digests[0], digests[1], digests[2], digests[3]), next_rules=next_rules)
    path = StepPath.NEW if live is None else StepPath.VERSIONED if changed else StepPath.UNCHANGED
    return Step(cfg, tuple(changed), rules, path)


def one_cgroup_step(cfg: Config, next_rules: int, cid: int, w: CgroupWant | None, raw: bytes | None) -> Step:
    """StepPath.ONE_CGROUP of cgroup id `cid` from its entry `raw` (None: absent) to `w` (None:
    none). `cfg`: the config to write (version and digests already the new ones);
    `next_rules`: the first rule set id no write has used. Pure."""
    old = CgroupEntry.unpack(raw) if raw is not None else None
    rules: dict[int, int] = {}
    if w is not None and w.rules is not None:
        if old is not None and old.rules and old.digest == w.entry(0).digest:
            rules[cid] = old.rules  # same grant, only its mark or endpoint flag changed
        else:
            rules[cid], next_rules = next_rules, next_rules + 1
    return Step(replace(cfg, next_rules=next_rules), ("cgroups",), rules, StepPath.ONE_CGROUP, cgroup=cid)


def natural_id(path: str) -> int:
    """The exemption id a path gets when no other path took it first (see exemption_ids)."""
    return (zlib.crc32(path.encode()) & marks.EXEMPT_ID_MASK) or 1


def _probe_passes(slot: int, natural: int, assigned: int) -> bool:
    """Did exemption_ids' probe from `natural` to `assigned` pass over `slot` (taken then)?
    Ids are 1..EXEMPT_ID_MASK and a probe steps i -> i % MASK + 1, +1 modulo MASK."""
    m = marks.EXEMPT_ID_MASK
    return (slot - natural) % m < (assigned - natural) % m


@dataclass
class ExemptionIndex:
    """What change_exemptions needs of a policy's exemptions as a whole, kept one change at
    a time: their ids (exemption_ids, hence marks), rule counts (capacity), and whether
    their paths can be trusted to name distinct cgroups."""

    exemptions: tuple[Exemption, ...]  # the policy's, as written last
    ids: dict[str, int]  # path -> exemption id
    by_id: dict[int, str]
    probed: dict[str, int]  # path -> its natural id, for the few whose id is not it
    ports: int  # ks_ports keys of all exemptions (ExemptionRules.counts)
    nets: int  # ks_nets keys of all exemptions, LAN not included
    # Duplicate or non-canonical paths: two paths may then be one cgroup, whose entry a
    # one-path change cannot compute alone.
    odd: bool

    @classmethod
    def build(cls, exemptions: tuple[Exemption, ...], rules: tuple[ExemptionRules, ...]) -> ExemptionIndex:
        """From a policy's exemptions and their render (_render_exemptions: same order)."""
        ids: dict[str, int] = {}
        probed: dict[str, int] = {}
        ports = nets = 0
        mask = marks.EXEMPT_ID_MASK
        for r in rules:
            i = r.mark & mask
            ids[r.cgroup] = i
            n = natural_id(r.cgroup)
            if n != i:
                probed[r.cgroup] = n
            p, q = r.counts
            ports += p
            nets += q
        odd = len(ids) != len(exemptions) or any(normalized_cgroup(p) != p for p in ids)
        return cls(exemptions, ids, {i: p for p, i in ids.items()}, probed, ports, nets, odd)

    def apply(self, change: ExemptionChange, exemptions: tuple[Exemption, ...]) -> None:
        """Take a change select_change chose (and that was written)."""
        path = change.path
        if change.old is not None and change.old_rules is not None:
            p, n = change.old_rules.counts
            self.ports -= p
            self.nets -= n
        if change.new is not None and change.new_rules is not None:
            p, n = change.new_rules.counts
            self.ports += p
            self.nets += n
        if change.new is None:
            del self.by_id[self.ids.pop(path)]
            self.probed.pop(path, None)
        elif change.old is None:
            self.ids[path] = change.id
            self.by_id[change.id] = path
        self.exemptions = exemptions


@dataclass(frozen=True)
class ExemptionChange:
    """The one exemption path whose exemption differs between two policies."""

    path: str
    old: Exemption | None  # before's (None: not exempt before)
    new: Exemption | None  # after's (None: not exempt after)
    id: int  # its exemption id (a path keeps its id while exempt)
    old_rules: ExemptionRules | None
    new_rules: ExemptionRules | None
    cgroups: int  # exempt and endpoint cgroups of `after` (capacity)
    ports: int  # port rules of `after`
    nets: int  # network rules of `after`, LAN included


def diff_exemptions(before: tuple[Exemption, ...], after: tuple[Exemption, ...],
                    limit: int = 1) -> list[tuple[Exemption | None, Exemption | None]] | None:
    """(before's, after's) exemption of each path whose exemption differs; None when more
    than `limit` do. Identity first, then ==: merge_exemptions keeps unchanged Exemption
    objects, so one exemption added, removed or replaced in a sorted tuple costs a scan by
    identity; anything else is compared path by path."""
    if before is after:
        return []
    nb, na = len(before), len(after)
    # The first position that differs: a binary search of prefix compares (C-level).
    lo, hi = 0, min(nb, na)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if before[:mid] == after[:mid]:
            lo = mid
        else:
            hi = mid - 1
    i = lo
    if i == nb == na:
        return []
    # One insertion, deletion or replacement at i, the rest the same (C-level compares)?
    if na == nb + 1 and after[i + 1:] == before[i:]:
        return [(None, after[i])]
    if nb == na + 1 and before[i + 1:] == after[i:]:
        return [(before[i], None)]
    if na == nb and before[i + 1:] == after[i + 1:]:
        if before[i].cgroup == after[i].cgroup:
            return [(before[i], after[i])]
        if limit < 2:
            return None
    old = {e.cgroup: e for e in before}
    new = {e.cgroup: e for e in after}
    out: list[tuple[Exemption | None, Exemption | None]] = []
    for path in sorted(old.keys() | new.keys()):
        x2, y2 = old.get(path), new.get(path)
        if x2 is y2 or (x2 is not None and y2 is not None and x2 == y2):
            continue
        out.append((x2, y2))
        if len(out) > limit:
            return None
    return out


def select_change(before: Policy, after: Policy, index: ExemptionIndex | None) -> ExemptionChange | str | None:
    """Whether going from `before` (what the maps hold) to `after` changes the wanted entry
    of exactly one exemption path, everything else kept: None when nothing differs, the
    change, or why not (the caller then writes `after` whole). Pure (index: of `before`)."""
    bt, at = before.tunnel, after.tunnel
    if bt.endpoint_cgroups != at.endpoint_cgroups or bt.endpoint_mark != at.endpoint_mark:
        return "endpoint cgroups differ"
    if before.lan != after.lan:
        return "lan differs"
    diff = diff_exemptions(before.exemptions, after.exemptions)
    if diff is None:
        return "more than one exemption differs"
    if not diff:
        return None
    if index is None:
        return "no index of the written exemptions"
    if index.exemptions is not before.exemptions and index.exemptions != before.exemptions:
        return "the exemptions written last are not `before`'s"
    if index.odd:
        return "duplicate or non-canonical exemption paths"
    ((old, new),) = diff
    path = (old or new).cgroup  # type: ignore[union-attr]
    if normalized_cgroup(path) != path or any(normalized_cgroup(c) != c for c in at.endpoint_cgroups):
        return "a non-canonical cgroup path"
    if old is not None:
        eid = index.ids.get(path)
        if eid is None:
            return "the index lacks the changed path"
    else:
        if path in index.ids:
            return "the index already has the added path"
        eid = natural_id(path)
        if eid in index.by_id:
            return "its exemption id collides with another's (marks move)"
    if new is None:
        for q, n in index.probed.items():
            if q > path and _probe_passes(eid, n, index.ids[q]):
                return "removing it moves another exemption's id (marks move)"
    mark = exempt_mark(eid)
    old_rules = rules_for(old, mark) if old is not None else None
    new_rules = rules_for(new, mark) if new is not None else None
    ports, nets = index.ports, index.nets + len(after.lan_networks(4)) + len(after.lan_networks(6))
    for rules, sign in ((old_rules, -1), (new_rules, 1)):
        if rules is not None:
            p, n = rules.counts
            ports += sign * p
            nets += sign * n
    count = len(index.ids) + (new is not None) - (old is not None)
    for c in set(at.endpoint_cgroups):
        if not ((c == path and new is not None) or (c != path and c in index.ids)):
            count += 1
    return ExemptionChange(path, old, new, eid, old_rules, new_rules, count, ports, nets)


def change_want(rules: ExemptionRules | None, endpoint: bool, endpoint_mark: int) -> CgroupWant | None:
    """The wanted ks_cgroups entry of one path (cgroup_wants for one), None when it has none."""
    if not endpoint:
        return rules.want if rules is not None else None
    return CgroupWant(rules, endpoint_mark or (rules.mark if rules is not None else 0), True)


_NORMALIZED: dict[str, str] = {}  # policy cgroup path -> normalize_cgroup(path)


def normalized_cgroup(path: str) -> str | None:
    """normalize_cgroup(path), memoized; None for an invalid path."""
    rel = _NORMALIZED.get(path)
    if rel is None:
        try:
            rel = normalize_cgroup(path)
        except ValueError:
            return None
        if len(_NORMALIZED) > 4 * MAX_CGROUPS:
            _NORMALIZED.clear()
        _NORMALIZED[path] = rel
    return rel
