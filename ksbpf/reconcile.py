"""Reconciliation: keep what the kernel enforces equal to the policy, after the daemon
engaged it.

Event-driven where the kernel offers events, with periodic checks as a backstop:

- rtnetlink (pyroute2, bound inside the namespace): links appearing, changing and going
  (a tunnel recreated with a new ifindex is followed by the routing default and the BPF
  tunnel map; a new non-tunnel interface gets its netdev egress chain) and changes to
  ksbpf's ip rules and routing table;
- nfnetlink (NFNLGRP_NFTABLES, a raw socket inside the namespace): any change to the
  ksbpf tables by another process;
- inotify on the cgroup directories exemptions name: a service restarted gets a new
  cgroup id and its exemption follows;
- BPF attachments have no notification: they are polled (cheap: a few bpf(2) calls).

Events only trigger checks; a check compares the kernel with what the policy renders
and repairs (and counts) a difference. The daemon's own changes trigger checks that
find nothing. Drift seen while the applied-policy record is gone is `ksctl down` at
work: not repaired (ExternalDown).

A run-time exemption change is O(changed) here: the cgroups of the exemptions that
came or went are resolved and watched, and the ruleset's fingerprint (a listing of
every set element, O(n)) is not taken on the request's path. Instead the nftables
generation the last fingerprint was taken at is kept: the next check takes a new one
if the nfnetlink watcher saw no other process change the ksbpf tables since that
generation (every transaction ends with its generation id and writer's pid), and
treats the tables as drifted if one did, or if notifications were lost meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksbpf.errors import BackendError, KsbpfError
from ksbpf.linux.cgroup import cgroup2_mount, cgroup_dir, cgroup_id
from ksbpf.linux.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
)
from ksbpf.linux.libc import LibcError
from ksbpf.linux.netlink import NFNLGRP_NFTABLES, NetlinkSocket
from ksbpf.linux.netns import netns
from ksbpf.linux.nftgen import NFT_MSG_NEWGEN, gen_after, nft_generation, nft_notifications
from ksbpf.policy import Policy
from ksbpf.verdict import interface_matches

log = logging.getLogger("ksbpf.reconcile")

TABLE = "ksbpf"
IFF_UP = 0x1


@dataclass(frozen=True)
class Event:
    kind: str  # link, routing, nft, cgroup, overflow
    detail: str = ""
    at: float = field(default_factory=time.monotonic)
    # cgroup: the directories made, removed or moved (each cgroup at or below one may have
    # a new id); None: anything may have changed (inotify overflow)
    paths: tuple[Path, ...] | None = None


Emit = Callable[[Event], None]


class ExternalDown(KsbpfError):
    """The layers went away together with the applied-policy record: `ksctl down`."""


# =========================================================================== watchers


class _Watcher(threading.Thread):
    """A thread blocked in select() on one fd and a stop pipe."""

    def __init__(self, name: str, emit: Emit) -> None:
        super().__init__(name=name, daemon=True)
        self.emit = emit
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wait_readable(self, fd: int) -> bool:
        """True when fd is readable, False when asked to stop."""
        ready, _, _ = select.select([fd, self._stop_r], [], [])
        return self._stop_r not in ready

    def start_and_wait(self, timeout: float = 5.0) -> None:
        """Start, and return once the socket is bound (or raise why it could not be)."""
        self.start()
        if not self.ready.wait(timeout):
            raise BackendError("reconcile", f"{self.name}: not ready after {timeout} s")
        if self.error is not None:
            raise BackendError("reconcile", f"{self.name}: {self.error}")


class NetlinkWatcher(_Watcher):
    """rtnetlink link, rule and route notifications of one network namespace."""

    def __init__(self, netns_name: str | None, emit: Emit) -> None:
        super().__init__("netlink-watch", emit)
        self.netns = netns_name

    def run(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import (
            RTMGRP_IPV4_ROUTE,
            RTMGRP_IPV4_RULE,
            RTMGRP_IPV6_ROUTE,
            RTMGRP_IPV6_RULE,
            RTMGRP_LINK,
        )

        from ksbpf.marks import ROUTE_TABLE
        from ksbpf.render.routing import RT_PROTO_KSBPF

        try:
            # The socket belongs to the namespace it is made in; this thread then leaves.
            with netns(self.netns):
                ipr = IPRoute()
                ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        except (OSError, KsbpfError) as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        try:
            while self._wait_readable(ipr.fileno()):
                try:
                    msgs = ipr.get()
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        self.emit(Event("overflow", "rtnetlink"))
                        continue
                    raise
                for m in msgs:
                    ev = m.get("event", "")
                    if ev in ("RTM_NEWLINK", "RTM_DELLINK"):
                        self.emit(Event("link", f"{ev} {m.get_attr('IFLA_IFNAME')} #{m.get('index')}"))
                    elif ev in ("RTM_NEWRULE", "RTM_DELRULE"):
                        if m.get_attr("FRA_PROTOCOL") == RT_PROTO_KSBPF:
                            self.emit(Event("routing", f"{ev} pref {m.get_attr('FRA_PRIORITY')}"))
                    elif ev in ("RTM_NEWROUTE", "RTM_DELROUTE"):
                        table = m.get_attr("RTA_TABLE") or m.get("table")
                        if table == ROUTE_TABLE:
                            self.emit(Event("routing", f"{ev} table {table}"))
        except Exception as e:  # report, the daemon falls back to periodic checks
            log.error("netlink watcher stopped: %s", e)
            self.emit(Event("overflow", f"netlink watcher stopped: {e}"))
        finally:
            ipr.close()


class NftWatcher(_Watcher):
    """nftables change notifications (what `nft monitor` reads), filtered to the ksbpf
    tables and to transactions of other processes.

    It also keeps the generation bookkeeping the Reconciler judges its own exemption
    changes by: `seen_gen`, the last transaction read; `foreign_gen`, the last one in
    which another process changed the ksbpf tables; `lost_upto`, the generation up to
    which notifications may have been lost (ENOBUFS), `lost_unknown` when even that is
    not known. Written by this thread only; wait_seen() lets another thread wait until
    every transaction up to a generation has been read."""

    def __init__(self, netns_name: str | None, emit: Emit, table: str = TABLE) -> None:
        super().__init__("nft-watch", emit)
        self.netns = netns_name
        self.table = table
        self.seen_gen: int | None = None
        self.foreign_gen: int | None = None
        self.lost_upto: int | None = None
        self.lost_unknown = False
        self._progress = threading.Condition()

    def wait_seen(self, gen: int, timeout: float = 2.0) -> bool:
        """Wait until every transaction up to generation `gen` has been read (or its loss
        counted). False on timeout, or when the watcher is not running."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while gen_after(gen, self.seen_gen):
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return False
                self._progress.wait(min(left, 0.1))
        return True

    def _seen(self, gen: int) -> None:
        with self._progress:
            if gen_after(gen, self.seen_gen):
                self.seen_gen = gen
            self._progress.notify_all()

    def _lost(self, gen_sock: NetlinkSocket) -> None:
        """Notifications were dropped: every transaction they belonged to committed before
        now, so the current generation bounds them."""
        gen = nft_generation(gen_sock)
        if gen is None:
            self.lost_unknown = True
            return
        if gen_after(gen, self.lost_upto):
            self.lost_upto = gen
        self._seen(gen)

    def run(self) -> None:
        try:
            sock = NetlinkSocket(netns_name=self.netns, groups=(NFNLGRP_NFTABLES,), rcvbuf=1 << 20)
            try:
                gen_sock = NetlinkSocket(netns_name=self.netns, timeout=2.0)
            except (OSError, KsbpfError):
                sock.close()
                raise
        except (OSError, KsbpfError) as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        me = os.getpid()
        touched = False
        try:
            while self._wait_readable(sock.fileno()):
                try:
                    msgs = sock.notifications()
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        touched = False
                        self._lost(gen_sock)
                        self.emit(Event("overflow", "nfnetlink"))
                        continue
                    raise
                for mtype, table, pid, gen in nft_notifications(msgs):
                    if mtype == NFT_MSG_NEWGEN:
                        if touched and pid != me:
                            if gen is not None:
                                self.foreign_gen = gen
                            else:
                                self.lost_unknown = True
                            self.emit(Event("nft", f"transaction by pid {pid}"))
                        touched = False
                        if gen is not None:
                            self._seen(gen)
                    elif table == self.table:
                        touched = True
        except Exception as e:
            log.error("nftables watcher stopped: %s", e)
            self.emit(Event("overflow", f"nftables watcher stopped: {e}"))
        finally:
            sock.close()
            gen_sock.close()
            with self._progress:
                self._progress.notify_all()


_WATCH_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR


class CgroupWatcher(_Watcher):
    """inotify on the directories that hold the cgroups exemptions name (or their nearest
    existing ancestor): a cgroup made or removed there is an event."""

    def __init__(self, emit: Emit) -> None:
        super().__init__("cgroup-watch", emit)
        try:
            self._inotify = Inotify()
        except LibcError as e:
            raise BackendError("reconcile", e.strerror) from None
        self._watches: dict[int, Path] = {}  # watch descriptor -> directory
        self._wd_of: dict[Path, int] = {}
        self._point: dict[Path, Path] = {}  # cgroup directory -> the directory watched for it
        self._refs: dict[Path, int] = {}  # watched directory -> how many cgroup directories it serves
        self._lock = threading.Lock()
        self.ready.set()

    @staticmethod
    def _watch_point(d: Path) -> Path:
        p = d.parent
        while not p.is_dir() and p != p.parent:
            p = p.parent
        return p

    def watch(self, cgroup_dirs: list[Path]) -> None:
        """Watch the parents of these cgroup directories (replacing earlier watches)."""
        points = {d: self._watch_point(d) for d in cgroup_dirs}
        with self._lock:
            self._point = points
            refs: dict[Path, int] = {}
            for p in points.values():
                refs[p] = refs.get(p, 0) + 1
            self._refs = refs
            for p in list(self._wd_of):
                if p not in refs:
                    self._unwatch(p)
            for p in sorted(set(refs) - set(self._wd_of)):
                self._add_watch(p)

    def change(self, added: list[Path], removed: list[Path]) -> None:
        """O(changed): watch for these cgroup directories too, and no longer for those."""
        with self._lock:
            for d in removed:
                p = self._point.pop(d, None)
                if p is None:
                    continue
                self._refs[p] -= 1
                if self._refs[p] <= 0:
                    del self._refs[p]
                    if p in self._wd_of:
                        self._unwatch(p)
            for d in added:
                if d in self._point:
                    continue
                p = self._point[d] = self._watch_point(d)
                self._refs[p] = self._refs.get(p, 0) + 1
                if p not in self._wd_of:
                    self._add_watch(p)

    def refresh(self, cgroup_dirs: list[Path]) -> None:
        """O(these): the nearest existing ancestor of these cgroup directories may have
        changed (a directory above them came or went): watch the right one."""
        with self._lock:
            for d in cgroup_dirs:
                new = self._watch_point(d)
                old = self._point.get(d)
                if new == old:
                    continue
                self._point[d] = new
                self._refs[new] = self._refs.get(new, 0) + 1
                if new not in self._wd_of:
                    self._add_watch(new)
                if old is not None:
                    self._refs[old] -= 1
                    if self._refs[old] <= 0:
                        del self._refs[old]
                        if old in self._wd_of:
                            self._unwatch(old)
            # A watch the kernel removed (its directory went) is made again where it can be.
            for p in [p for p in self._refs if p not in self._wd_of and p.is_dir()]:
                self._add_watch(p)

    def _add_watch(self, p: Path) -> None:
        try:
            wd = self._inotify.add_watch(p, _WATCH_MASK)
        except LibcError as e:
            log.warning("cannot watch %s: %s", p, e.reason)
            return
        self._watches[wd] = p
        self._wd_of[p] = wd

    def _unwatch(self, p: Path) -> None:
        wd = self._wd_of.pop(p)
        self._watches.pop(wd, None)
        self._inotify.rm_watch(wd)

    def watched(self) -> list[Path]:
        with self._lock:
            return sorted(self._watches.values())

    def run(self) -> None:
        try:
            while self._wait_readable(self._inotify.fileno()):
                names = []
                paths: list[Path] | None = []
                for wd, mask, _cookie, name in self._inotify.read():
                    with self._lock:
                        where = self._watches.get(wd)
                    if mask & IN_Q_OVERFLOW:
                        names.append("(overflow)")
                        paths = None
                    elif mask & IN_IGNORED:
                        with self._lock:
                            gone = self._watches.pop(wd, None)
                            if gone is not None and self._wd_of.get(gone) == wd:
                                del self._wd_of[gone]
                        if gone is None:
                            continue  # a watch we removed ourselves
                        names.append("(watch removed)")
                        if paths is not None:
                            paths.append(gone)  # the directory went: everything below it may have
                    else:
                        names.append(name or "(self)")
                        if paths is not None and where is not None:
                            # An entry of a watched directory, or (no name) the directory itself.
                            paths.append(where / name if name else where)
                        else:
                            paths = None
                if names:
                    self.emit(Event("cgroup", ", ".join(names), paths=None if paths is None else tuple(paths)))
        finally:
            self._inotify.close()


# =========================================================================== checks


@dataclass(frozen=True)
class NftShape:
    """What a ruleset is made of, without its counter values: chains (with hook, policy,
    device), rule counts per chain, sets and counters, per table family."""

    chains: frozenset[tuple[str, str, str, str, str]]
    rules: frozenset[tuple[str, str, int]]
    sets: frozenset[tuple[str, str]]
    counters: frozenset[tuple[str, str]]

    def devices_as_listed(self, listed: NftShape) -> NftShape:
        """This (expected) shape with a chain's device left out wherever the listing
        shows that chain without one: nft 1.0.6's JSON output leaves out the device of a
        netdev chain (its text output has it). The chain's name (egress_if<ifindex>)
        still names the interface, so that is all that goes unchecked."""
        blank = {(c[0], c[1]) for c in listed.chains if not c[4]}
        if not blank:
            return self
        chains = frozenset((f, n, h, p, "" if (f, n) in blank else d) for f, n, h, p, d in self.chains)
        return NftShape(chains, self.rules, self.sets, self.counters)

    def describe_difference(self, other: NftShape) -> str:
        parts = []
        for what in ("chains", "rules", "sets", "counters"):
            mine, theirs = getattr(self, what), getattr(other, what)
            if mine != theirs:
                missing = sorted(mine - theirs)[:3]
                extra = sorted(theirs - mine)[:3]
                parts.append(f"{what}: expected {missing or '-'} found {extra or '-'}")
        return "; ".join(parts)


def shape_of(objects: list[dict[str, Any]]) -> NftShape:
    """The shape of a JSON ruleset: a rendered batch's commands or a kernel listing."""
    chains, sets, counters = set(), set(), set()
    rules: dict[tuple[str, str], int] = {}
    for obj in objects:
        if "add" in obj:
            obj = obj["add"]
        elif len(obj) != 1 or "metainfo" in obj or "delete" in obj or "flush" in obj:
            continue
        kind, body = next(iter(obj.items()))
        if not isinstance(body, dict):
            continue
        fam = str(body.get("family", ""))
        if kind == "chain":
            dev = body.get("dev", "")
            dev = ",".join(dev) if isinstance(dev, list) else str(dev)
            chains.add((fam, str(body["name"]), str(body.get("hook", "")), str(body.get("policy", "")), dev))
        elif kind == "rule":
            key = (fam, str(body["chain"]))
            rules[key] = rules.get(key, 0) + 1
        elif kind == "set":
            sets.add((fam, str(body["name"])))
        elif kind == "counter":
            counters.add((fam, str(body["name"])))
    return NftShape(frozenset(chains), frozenset((f, c, n) for (f, c), n in rules.items()), frozenset(sets), frozenset(counters))


def fingerprint(objects: list[dict[str, Any]]) -> str:
    """Digest of a kernel listing with counter values left out: a rule replaced, an
    element added or a chain re-made (new handles) changes it; traffic does not."""
    clean = []
    for obj in objects:
        if "metainfo" in obj:
            continue
        if "counter" in obj and isinstance(obj["counter"], dict):
            obj = {"counter": {k: v for k, v in obj["counter"].items() if k not in ("packets", "bytes")}}
        clean.append(obj)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()


def _nft_listing() -> list[dict[str, Any]] | None:
    """Both ksbpf tables as JSON objects (handles included); None when `table inet ksbpf`
    is missing. Called inside the namespace."""
    import nftables

    from ksbpf.render.nft import INET, NETDEV

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


def _nft_listing_at_generation(tries: int = 3) -> tuple[int | None, list[dict[str, Any]] | None]:
    """_nft_listing() and the nftables generation it shows (None when the ruleset kept
    changing while it was read, or the kernel did not say). Called inside the namespace."""
    listing = None
    for _ in range(tries):
        before = nft_generation()
        listing = _nft_listing()
        if before is not None and nft_generation() == before:
            return before, listing
    return None, listing


def _cgroup_mount() -> Path | None:
    try:
        return cgroup2_mount().resolve()
    except (KsbpfError, OSError):
        return None


def _resolve_cgroup(path: str, mount: Path | None) -> tuple[Path | None, int | None]:
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


class Reconciler:
    """Owns the expectations for one engine and repairs drift. Not thread-safe: the
    daemon calls it from its main loop only. `snapshot_*` fields are read by metrics."""

    def __init__(self, engine: Any, *, bpf: bool = True, settle_s: float = 0.3) -> None:
        self.engine = engine
        self.netns: str | None = engine.netns
        self.bpf_wanted = bpf
        self.settle_s = settle_s
        self.policy: Policy | None = None  # effective: file + run-time exemptions
        self.links = LinkState({}, {})
        self.drift_repairs = {"nftables": 0, "routing": 0, "bpf": 0}
        self.layers: dict[str, bool] = {}
        self.bpf_engaged = False
        self.cgroup_ids: dict[str, int | None] = {}
        self._cgroup_dirs: dict[str, Path | None] = {}  # exempt or endpoint cgroup -> its directory
        self._expected: tuple[Any, NftShape] | None = None
        self._fingerprint: str | None = None
        self._fingerprint_gen: int | None = None  # the nftables generation it was taken at
        # ksbpf changed exemption sets since the fingerprint; the next nft check takes a new one
        self.fingerprint_stale = False
        self.nft_watcher: NftWatcher | None = None  # set by the daemon; without it every change is listed at once
        self._applied_uplinks: dict[int, str] = {}
        self.last_tunnel_follow_s: float | None = None

    # ------------------------------------------------------------------ expectations

    def engaged(self, effective: Policy, layers: dict[str, Any]) -> tuple[list[Path], list[Path]] | None:
        """After the engine engaged (or re-engaged) `effective`: take it as the truth.
        The first time, every cgroup is resolved (watch all of cgroup_dirs()) and None is
        returned. A re-engage (reload) is O(changed) like exemptions_changed when nftables
        took set element changes only, and returns the directories to watch now and those
        no longer to watch."""
        first = self.policy is None
        self.layers = {n: bool(s.engaged) for n, s in layers.items()}
        self.bpf_engaged = self.layers.get("bpf", False)
        with netns(self.netns):
            self.links = read_links(effective)
        self._applied_uplinks = dict(self.links.uplinks)
        if first:
            self.policy = effective
            self._expected = None
            self._snapshot_nft()
            self.cgroup_ids = self._resolve_cgroups()
            return None
        by_changes = getattr(self.engine.nft, "last_apply", "") in ("changes", "unchanged")
        return self._follow(effective, defer_fingerprint=by_changes)

    def exemptions_changed(self, effective: Policy) -> tuple[list[Path], list[Path]]:
        """After the engine updated the exemption sets and BPF maps. O(changed) in the
        kernel and the file system: only the cgroups of exemptions that came or went are
        resolved, and the nft fingerprint is left to the next check (see the module
        docstring) when the generation bookkeeping allows it. Returns the cgroup
        directories to watch now and those no longer to watch."""
        return self._follow(effective, defer_fingerprint=True)

    def _follow(self, effective: Policy, defer_fingerprint: bool) -> tuple[list[Path], list[Path]]:
        self.policy = effective
        self._expected = None
        if defer_fingerprint and self._can_defer_fingerprint():
            self.fingerprint_stale = True
        else:
            self._snapshot_nft()
        old = set(self.cgroup_ids)
        new = self._cgroup_paths(effective)
        added, removed = sorted(new - old), sorted(old - new)
        gone_dirs = []
        for path in removed:
            self.cgroup_ids.pop(path, None)
            d = self._cgroup_dirs.pop(path, None)
            if d is not None:
                gone_dirs.append(d)
        new_dirs = []
        if added:
            mount = _cgroup_mount()
            for path in added:
                d, cid = _resolve_cgroup(path, mount)
                self._cgroup_dirs[path] = d
                self.cgroup_ids[path] = cid
                if d is not None:
                    new_dirs.append(d)
        return new_dirs, gone_dirs

    def _can_defer_fingerprint(self) -> bool:
        w = self.nft_watcher
        return (w is not None and w.is_alive() and self._fingerprint is not None
                and self._fingerprint_gen is not None and (self.fingerprint_stale or not w.lost_unknown))

    def _snapshot_nft(self) -> None:
        """Take what the kernel holds now as the truth (after ksbpf's own change)."""
        with netns(self.netns):
            gen, listing = _nft_listing_at_generation()
        self._adopt(listing, gen)

    def _adopt(self, listing: list[dict[str, Any]] | None, gen: int | None) -> None:
        w = self.nft_watcher
        if gen is not None and w is not None and not w.wait_seen(gen):
            gen = None  # the watcher is behind: the next exemption change lists at once
        self._fingerprint = fingerprint(listing) if listing is not None else None
        self._fingerprint_gen = gen
        self.fingerprint_stale = False

    def _foreign_change(self, gen: int | None) -> str | None:
        """While the fingerprint is stale: did anything but ksbpf change the ksbpf tables
        since the fingerprint's generation, up to `gen` (the listing in hand)? A reason
        when it did or when that cannot be told (notifications lost), else None."""
        w = self.nft_watcher
        if w is None or not w.is_alive():
            return "the nftables watcher is not running, so a change by another process cannot be ruled out"
        if gen is None or not w.wait_seen(gen):
            return "the ruleset kept changing while it was read"
        if gen_after(w.foreign_gen, self._fingerprint_gen):
            return "another process changed the ksbpf tables while ksbpf was changing exemptions"
        if w.lost_unknown or gen_after(w.lost_upto, self._fingerprint_gen):
            return "nftables notifications were lost while ksbpf was changing exemptions"
        return None

    def expected_shape(self) -> NftShape:
        from ksbpf.render.nft import render_nft

        assert self.policy is not None
        key = (id(self.policy), tuple(sorted(self._applied_uplinks.items())))
        if self._expected is None or self._expected[0] != key:
            batch = render_nft(self.policy, self._applied_uplinks)
            self._expected = (key, shape_of(batch["nftables"]))
        return self._expected[1]

    @staticmethod
    def _cgroup_paths(policy: Policy) -> set[str]:
        return {e.cgroup for e in policy.exemptions} | set(policy.tunnel.endpoint_cgroups)

    def exempt_cgroups(self) -> list[str]:
        if self.policy is None:
            return []
        return sorted(self._cgroup_paths(self.policy))

    def _resolve_cgroups(self, fresh: bool = True) -> dict[str, int | None]:
        """Every exempt and endpoint cgroup -> its id now (None: not there); remembers
        their directories for cgroup_dirs(). Not `fresh`: the directories already known
        are reused (a cgroup2 path cannot come to mean another directory), one stat each."""
        mount: Path | None = None
        have_mount = False
        out: dict[str, int | None] = {}
        dirs: dict[str, Path | None] = {}
        for path in self.exempt_cgroups():
            if not fresh and path in self._cgroup_dirs:
                dirs[path] = d = self._cgroup_dirs[path]
                out[path] = _cgroup_id_or_none(d)
                continue
            if not have_mount:
                mount, have_mount = _cgroup_mount(), True
            dirs[path], out[path] = _resolve_cgroup(path, mount)
        self._cgroup_dirs = dirs
        return out

    def cgroup_dirs(self, under: tuple[Path, ...] | list[Path] | None = None) -> list[Path]:
        """The directories of the exempt and endpoint cgroups, as last resolved; with
        `under`, only those at or below one of these directories."""
        dirs = [d for d in self._cgroup_dirs.values() if d is not None]
        if under is None:
            return dirs
        return [d for d in dirs if _at_or_below(d, under)]

    # ------------------------------------------------------------------ guard

    def _confirm_drift(self, still_there: Callable[[], bool]) -> bool:
        """Wait `settle_s`, then: is the drift still there, and is it not `ksctl down`
        (which removes the layers, then the applied-policy record)?"""
        time.sleep(self.settle_s)
        if not self.engine.applied_policy_path.exists():
            raise ExternalDown("the applied-policy record is gone: `ksctl down` removed enforcement")
        return still_there()

    # ------------------------------------------------------------------ links

    def on_links(self, since: float | None = None) -> list[str]:
        """Follow link changes: tunnel ifindexes into routing and the BPF map, a changed
        set of other interfaces into the netdev egress chains. Returns what was done.
        `since`: when the first link event arrived (the follow time is measured from it)."""
        assert self.policy is not None
        t0 = since if since is not None else time.monotonic()
        with netns(self.netns):
            now = read_links(self.policy)
        done: list[str] = []
        if now.tunnels != self.links.tunnels:
            self.engine.routing.sync_tunnel_routes(self.policy)
            if self.bpf_engaged:
                try:
                    self.engine.bpf_layer(self.policy).update_tunnel_ifindexes(self.policy)
                except BackendError as e:
                    log.error("BPF tunnel map not updated: %s", e)
            self.last_tunnel_follow_s = time.monotonic() - t0
            desc = ", ".join(f"{n} #{i} {'up' if up else 'down'}" for i, (n, up) in sorted(now.tunnels.items())) or "none"
            done.append(f"tunnel links now: {desc} (routing and BPF map followed in {self.last_tunnel_follow_s * 1000:.1f} ms)")
        self.links = now
        if now.uplinks != self._applied_uplinks:
            added = sorted(set(now.uplinks.values()) - set(self._applied_uplinks.values()))
            gone = sorted(set(self._applied_uplinks.values()) - set(now.uplinks.values()))
            self.engine.nft.apply(self.policy)
            self._applied_uplinks = dict(now.uplinks)
            self._expected = None
            self._snapshot_nft()
            done.append(
                "netdev egress chains follow the interfaces"
                + (f": added {', '.join(added)}" if added else "")
                + (f"; removed {', '.join(gone)}" if gone else "")
            )
        return done

    def tunnel_state(self) -> dict[str, bool]:
        """interface -> up, for every tunnel link; an unmatched pattern -> False."""
        out = {n: up for n, up in self.links.tunnels.values()}
        if self.policy is not None:
            for pattern in self.policy.tunnel.interfaces:
                if not any(interface_matches(n, (pattern,)) for n in out):
                    out[pattern] = False
        return out

    # ------------------------------------------------------------------ nftables

    def nft_drift(self) -> str | None:
        """What differs between the kernel's ksbpf tables and the policy, or None. With a
        stale fingerprint (ksbpf changed exemptions since), the listing in hand becomes
        the fingerprint unless another process may have changed the tables meanwhile."""
        stale = self.fingerprint_stale
        with netns(self.netns):
            gen, listing = _nft_listing_at_generation() if stale else (None, _nft_listing())
        if listing is None:
            return "table inet ksbpf is missing"
        have = shape_of(listing)
        want = self.expected_shape().devices_as_listed(have)
        if have != want:
            return want.describe_difference(have) or "the ruleset's shape differs"
        if stale:
            foreign = self._foreign_change(gen)
            if foreign is not None:
                return foreign
            self._adopt(listing, gen)
            return None
        if self._fingerprint is not None and fingerprint(listing) != self._fingerprint:
            return "a rule, set or element was changed"
        return None

    def _uplinks_moved(self) -> bool:
        """Interfaces came or went since the last apply: the kernel removes a deleted
        device's netdev chain itself. That is on_links' business, not drift."""
        assert self.policy is not None
        with netns(self.netns):
            return read_links(self.policy).uplinks != self._applied_uplinks

    def check_nft(self) -> str | None:
        """Repair nftables drift; returns what was repaired, or None."""
        what = self.nft_drift()
        if what is None or not self._confirm_drift(lambda: self.nft_drift() is not None):
            return None
        if self._uplinks_moved():
            return None
        assert self.policy is not None
        what = self.nft_drift() or what
        self.engine.nft.apply(self.policy)
        self._snapshot_nft()
        self.drift_repairs["nftables"] += 1
        self.layers["nftables"] = True
        return what

    # ------------------------------------------------------------------ routing

    def routing_drift(self) -> str | None:
        from pyroute2 import IPRoute

        from ksbpf.linux.routing import src_valid_mark, tunnel_links
        from ksbpf.render.routing import RouteSpec, render_routing

        assert self.policy is not None
        with netns(self.netns), IPRoute() as ipr:
            plan = render_routing(self.policy, tunnel_links(ipr, self.policy))
            # The routing layer's own reading of its rules and routes, so both agree.
            have_rules, have_routes = self.engine.routing._current(ipr)
            # ...and of the sysctl it needs, as its status() reads it
            mark_ok, mark = src_valid_mark()
        want_routes = {RouteSpec(r.family, r.table, r.metric, r.blackhole, r.oif) for r in plan.routes}
        missing = sorted(set(plan.rules) - have_rules)
        extra = sorted(have_rules - set(plan.rules))
        parts = [f"rule missing: {r.describe()}" for r in missing[:3]]
        parts += [f"unexpected rule: {r.describe()}" for r in extra[:3]]
        if want_routes != have_routes:
            parts += [f"route missing: {r.describe()}" for r in sorted(want_routes - have_routes)[:3]]
            parts += [f"unexpected route: {r.describe()}" for r in sorted(have_routes - want_routes)[:3]]
        if not mark_ok:
            parts.append(mark)
        return "; ".join(parts) or None

    def check_routing(self) -> str | None:
        """Repair routing drift (the sysctl included). A repair the environment refuses
        (a read-only /proc/sys/net) leaves the layer not engaged: raised once, when it
        was engaged until now, and quietly after that (status says why)."""
        what = self.routing_drift()
        if what is None:
            self.layers["routing"] = True
            return None
        if not self._confirm_drift(lambda: self.routing_drift() is not None):
            return None
        assert self.policy is not None
        what = self.routing_drift() or what
        try:
            self.engine.routing.apply(self.policy)
        except BackendError:
            was = self.layers.get("routing", False)
            self.layers["routing"] = False
            if was:
                raise
            return None
        self.drift_repairs["routing"] += 1
        self.layers["routing"] = True
        return what

    # ------------------------------------------------------------------ bpf

    def bpf_status(self) -> tuple[bool, str]:
        engaged, detail = self.engine.bpf_layer(self.policy).status()
        return bool(engaged), str(detail)

    def check_bpf(self) -> str | None:
        """Re-attach a detached program (no compile), or re-apply when the pins are gone."""
        if not self.bpf_engaged:
            return None
        engaged, detail = self.bpf_status()
        if engaged or not self._confirm_drift(lambda: not self.bpf_status()[0]):
            return None
        assert self.policy is not None
        layer = self.engine.bpf_layer(self.policy)
        try:
            repaired = layer.ensure_attached()
        except BackendError as e:
            log.warning("BPF: cannot re-attach (%s); applying a new generation", e.reason)
            repaired = []
        if not self.bpf_status()[0]:
            layer.apply(self.policy)
            repaired = ["applied a new generation"]
        self.drift_repairs["bpf"] += 1
        self.layers["bpf"] = True
        return f"{detail}; repaired: {', '.join(repaired) or 'nothing to do'}"

    def check_cgroups(self, under: tuple[Path, ...] | list[Path] | None = None) -> list[str]:
        """Exempt or endpoint cgroups recreated (new id) or appeared: BPF maps follow.
        `under`: inotify saw directories made or removed there, and only the cgroups at or
        below them are looked at (O(those)); None: all of them."""
        if under is None:
            now = self._resolve_cgroups(fresh=False)
        else:
            now = dict(self.cgroup_ids)
            for path, d in self._cgroup_dirs.items():
                if d is not None and _at_or_below(d, under):
                    now[path] = _cgroup_id_or_none(d)
        if now == self.cgroup_ids:
            return []
        changes = [
            f"{p}: id {self.cgroup_ids.get(p)} -> {now.get(p)}"
            for p in sorted(set(now) | set(self.cgroup_ids))
            if now.get(p) != self.cgroup_ids.get(p)
        ]
        if self.bpf_engaged and self.policy is not None:
            self.engine.bpf_layer(self.policy).update_exemptions(self.policy)
        self.cgroup_ids = now
        return changes


def _cgroup_id_or_none(d: Path | None) -> int | None:
    if d is None:
        return None
    try:
        return cgroup_id(d)
    except OSError:
        return None


def _at_or_below(d: Path, under: tuple[Path, ...] | list[Path]) -> bool:
    s = str(d)
    for u in under:
        us = str(u)
        if s == us or s.startswith(us + "/"):
            return True
    return False
