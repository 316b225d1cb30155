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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksbpf.errors import BackendError, KsbpfError
from ksbpf.linux.netns import netns
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


NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID = 2


def parse_nft_notifications(data: bytes) -> list[tuple[int, str | None, int | None]]:
    """nfnetlink messages -> (message type, table name or None, writer pid or None).
    Attribute 1 names the table in every table, chain, rule, set, element and object
    message; NEWGEN ends each transaction and carries the writer's pid."""
    out: list[tuple[int, str | None, int | None]] = []
    off = 0
    while off + 20 <= len(data):
        length, typ = struct.unpack_from("=IH", data, off)
        if length < 20 or off + length > len(data):
            break
        if typ >> 8 == NFNL_SUBSYS_NFTABLES:
            attrs: dict[int, bytes] = {}
            a = off + 20  # nlmsghdr (16) + nfgenmsg (4)
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                attrs[atype & 0x3FFF] = data[a + 4:a + alen]
                a += (alen + 3) & ~3
            mtype = typ & 0xFF
            if mtype == NFT_MSG_NEWGEN:
                raw = attrs.get(NFTA_GEN_PROC_PID)
                out.append((mtype, None, struct.unpack("!I", raw)[0] if raw and len(raw) == 4 else None))
            else:
                name = attrs.get(1)
                out.append((mtype, name.split(b"\0", 1)[0].decode(errors="replace") if name else None, None))
        off += (length + 3) & ~3
    return out


class NftWatcher(_Watcher):
    """nftables change notifications (what `nft monitor` reads), filtered to the ksbpf
    tables and to transactions of other processes."""

    def __init__(self, netns_name: str | None, emit: Emit, table: str = TABLE) -> None:
        super().__init__("nft-watch", emit)
        self.netns = netns_name
        self.table = table

    def run(self) -> None:
        try:
            with netns(self.netns):
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
                sock.bind((0, 0))
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
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
                    data = sock.recv(1 << 16)
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        touched = False
                        self.emit(Event("overflow", "nfnetlink"))
                        continue
                    raise
                for mtype, table, pid in parse_nft_notifications(data):
                    if mtype == NFT_MSG_NEWGEN:
                        if touched and pid != me:
                            self.emit(Event("nft", f"transaction by pid {pid}"))
                        touched = False
                    elif table == self.table:
                        touched = True
        except Exception as e:
            log.error("nftables watcher stopped: %s", e)
            self.emit(Event("overflow", f"nftables watcher stopped: {e}"))
        finally:
            sock.close()


IN_CREATE, IN_DELETE, IN_MOVED_FROM, IN_MOVED_TO = 0x100, 0x200, 0x40, 0x80
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED, IN_Q_OVERFLOW, IN_ONLYDIR = 0x400, 0x800, 0x8000, 0x4000, 0x1000000
_WATCH_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR


class CgroupWatcher(_Watcher):
    """inotify on the directories that hold the cgroups exemptions name (or their nearest
    existing ancestor): a cgroup made or removed there is an event."""

    def __init__(self, emit: Emit) -> None:
        super().__init__("cgroup-watch", emit)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise BackendError("reconcile", f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self._watches: dict[int, Path] = {}
        self._lock = threading.Lock()
        self.ready.set()

    def watch(self, cgroup_dirs: list[Path]) -> None:
        """Watch the parents of these cgroup directories (replacing earlier watches)."""
        wanted: set[Path] = set()
        for d in cgroup_dirs:
            p = d.parent
            while not p.is_dir() and p != p.parent:
                p = p.parent
            wanted.add(p)
        with self._lock:
            for wd, path in list(self._watches.items()):
                if path not in wanted:
                    self._libc.inotify_rm_watch(self._fd, wd)
                    del self._watches[wd]
            have = set(self._watches.values())
            for p in sorted(wanted - have):
                wd = self._libc.inotify_add_watch(self._fd, os.fsencode(p), _WATCH_MASK)
                if wd < 0:
                    log.warning("cannot watch %s: %s", p, os.strerror(ctypes.get_errno()))
                    continue
                self._watches[wd] = p

    def watched(self) -> list[Path]:
        with self._lock:
            return sorted(self._watches.values())

    def run(self) -> None:
        try:
            while self._wait_readable(self._fd):
                try:
                    data = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    continue
                off = 0
                names = []
                while off + 16 <= len(data):
                    wd, mask, _cookie, ln = struct.unpack_from("iIII", data, off)
                    name = data[off + 16:off + 16 + ln].split(b"\0", 1)[0].decode(errors="replace")
                    off += 16 + ln
                    if mask & IN_Q_OVERFLOW:
                        names.append("(overflow)")
                    elif mask & IN_IGNORED:
                        with self._lock:
                            self._watches.pop(wd, None)
                        names.append("(watch removed)")
                    else:
                        names.append(name or "(self)")
                if names:
                    self.emit(Event("cgroup", ", ".join(names)))
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)


# =========================================================================== checks


@dataclass(frozen=True)
class NftShape:
    """What a ruleset is made of, without its counter values: chains (with hook, policy,
    device), rule counts per chain, sets and counters, per table family."""

    chains: frozenset[tuple[str, str, str, str, str]]
    rules: frozenset[tuple[str, str, int]]
    sets: frozenset[tuple[str, str]]
    counters: frozenset[tuple[str, str]]

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
        self._expected: tuple[Any, NftShape] | None = None
        self._fingerprint: str | None = None
        self._applied_uplinks: dict[int, str] = {}
        self.last_tunnel_follow_s: float | None = None

    # ------------------------------------------------------------------ expectations

    def engaged(self, effective: Policy, layers: dict[str, Any]) -> None:
        """After the engine engaged (or re-engaged) `effective`: take it as the truth."""
        self.policy = effective
        self.layers = {n: bool(s.engaged) for n, s in layers.items()}
        self.bpf_engaged = self.layers.get("bpf", False)
        with netns(self.netns):
            self.links = read_links(effective)
        self._applied_uplinks = dict(self.links.uplinks)
        self._expected = None
        self._snapshot_nft()
        self.cgroup_ids = self._resolve_cgroups()

    def exemptions_changed(self, effective: Policy) -> None:
        """After the engine updated the exemption sets and BPF maps."""
        self.policy = effective
        self._expected = None
        self._snapshot_nft()
        self.cgroup_ids = self._resolve_cgroups()

    def _snapshot_nft(self) -> None:
        with netns(self.netns):
            listing = _nft_listing()
        self._fingerprint = fingerprint(listing) if listing is not None else None

    def expected_shape(self) -> NftShape:
        from ksbpf.render.nft import render_nft

        assert self.policy is not None
        key = (id(self.policy), tuple(sorted(self._applied_uplinks.items())))
        if self._expected is None or self._expected[0] != key:
            batch = render_nft(self.policy, self._applied_uplinks)
            self._expected = (key, shape_of(batch["nftables"]))
        return self._expected[1]

    def exempt_cgroups(self) -> list[str]:
        if self.policy is None:
            return []
        return sorted({e.cgroup for e in self.policy.exemptions} | set(self.policy.tunnel.endpoint_cgroups))

    def _resolve_cgroups(self) -> dict[str, int | None]:
        from ksbpf.linux.cgroup import cgroup_dir, cgroup_id

        out: dict[str, int | None] = {}
        for path in self.exempt_cgroups():
            try:
                out[path] = cgroup_id(cgroup_dir(path))
            except (KsbpfError, OSError):
                out[path] = None
        return out

    def cgroup_dirs(self) -> list[Path]:
        from ksbpf.linux.cgroup import cgroup_dir

        out = []
        for path in self.exempt_cgroups():
            with contextlib.suppress(KsbpfError):
                out.append(cgroup_dir(path))
        return out

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
        """What differs between the kernel's ksbpf tables and the policy, or None."""
        with netns(self.netns):
            listing = _nft_listing()
        if listing is None:
            return "table inet ksbpf is missing"
        want = self.expected_shape()
        have = shape_of(listing)
        if have != want:
            return want.describe_difference(have) or "the ruleset's shape differs"
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

        from ksbpf.linux.routing import tunnel_links
        from ksbpf.render.routing import RouteSpec, render_routing

        assert self.policy is not None
        with netns(self.netns), IPRoute() as ipr:
            plan = render_routing(self.policy, tunnel_links(ipr, self.policy))
            # The routing layer's own reading of its rules and routes, so both agree.
            have_rules, have_routes = self.engine.routing._current(ipr)
        want_routes = {RouteSpec(r.family, r.table, r.metric, r.blackhole, r.oif) for r in plan.routes}
        missing = sorted(set(plan.rules) - have_rules)
        extra = sorted(have_rules - set(plan.rules))
        parts = [f"rule missing: {r.describe()}" for r in missing[:3]]
        parts += [f"unexpected rule: {r.describe()}" for r in extra[:3]]
        if want_routes != have_routes:
            parts += [f"route missing: {r.describe()}" for r in sorted(want_routes - have_routes)[:3]]
            parts += [f"unexpected route: {r.describe()}" for r in sorted(have_routes - want_routes)[:3]]
        return "; ".join(parts) or None

    def check_routing(self) -> str | None:
        what = self.routing_drift()
        if what is None or not self._confirm_drift(lambda: self.routing_drift() is not None):
            return None
        assert self.policy is not None
        what = self.routing_drift() or what
        self.engine.routing.apply(self.policy)
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

    def check_cgroups(self) -> list[str]:
        """Exempt or endpoint cgroups recreated (new id) or appeared: BPF maps follow."""
        now = self._resolve_cgroups()
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
