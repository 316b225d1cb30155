"""The reconciler's watchers: threads that turn kernel notifications into `Event`s,
each blocked in select() on one descriptor and a stop pipe. An event only says where to
look; the daemon's loop runs the checks (ksbpf.reconcile.reconciler)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ksbpf.errors import BackendError, KsbpfError
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
from ksbpf.render.nft import TABLE

log = logging.getLogger("ksbpf.reconcile")


class EventKind(StrEnum):
    """What an event is about, so which checks it calls for. A str: logs read the same."""

    LINK = "link"  # a link came, changed or went (rtnetlink)
    ROUTING = "routing"  # one of ksbpf's ip rules or its table's routes changed (rtnetlink)
    NFT = "nft"  # another process changed the ksbpf tables (nfnetlink)
    CGROUP = "cgroup"  # a directory came or went where exempt cgroups live (inotify)
    OVERFLOW = "overflow"  # events were lost, or a watcher stopped: check everything


@dataclass(frozen=True)
class Event:
    kind: EventKind
    detail: str = ""
    at: float = field(default_factory=time.monotonic)
    # cgroup: the directories made, removed or moved (each cgroup at or below one may have
    # a new id); None: anything may have changed (inotify overflow)
    paths: tuple[Path, ...] | None = None


Emit = Callable[[Event], None]


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
                        self.emit(Event(EventKind.OVERFLOW, "rtnetlink"))
                        continue
                    raise
                for m in msgs:
                    ev = m.get("event", "")
                    if ev in ("RTM_NEWLINK", "RTM_DELLINK"):
                        self.emit(Event(EventKind.LINK, f"{ev} {m.get_attr('IFLA_IFNAME')} #{m.get('index')}"))
                    elif ev in ("RTM_NEWRULE", "RTM_DELRULE"):
                        if m.get_attr("FRA_PROTOCOL") == RT_PROTO_KSBPF:
                            self.emit(Event(EventKind.ROUTING, f"{ev} pref {m.get_attr('FRA_PRIORITY')}"))
                    elif ev in ("RTM_NEWROUTE", "RTM_DELROUTE"):
                        table = m.get_attr("RTA_TABLE") or m.get("table")
                        if table == ROUTE_TABLE:
                            self.emit(Event(EventKind.ROUTING, f"{ev} table {table}"))
        except Exception as e:  # report, the daemon falls back to periodic checks
            log.error("netlink watcher stopped: %s", e)
            self.emit(Event(EventKind.OVERFLOW, f"netlink watcher stopped: {e}"))
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
                        self.emit(Event(EventKind.OVERFLOW, "nfnetlink"))
                        continue
                    raise
                for mtype, table, pid, gen in nft_notifications(msgs):
                    if mtype == NFT_MSG_NEWGEN:
                        if touched and pid != me:
                            if gen is not None:
                                self.foreign_gen = gen
                            else:
                                self.lost_unknown = True
                            self.emit(Event(EventKind.NFT, f"transaction by pid {pid}"))
                        touched = False
                        if gen is not None:
                            self._seen(gen)
                    elif table == self.table:
                        touched = True
        except Exception as e:
            log.error("nftables watcher stopped: %s", e)
            self.emit(Event(EventKind.OVERFLOW, f"nftables watcher stopped: {e}"))
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
                    self.emit(Event(EventKind.CGROUP, ", ".join(names), paths=None if paths is None else tuple(paths)))
        finally:
            self._inotify.close()
