"""The Reconciler: keeps what the kernel enforces equal to the policy the daemon
engaged, repairing (and counting) drift, following links and cgroups. See the package
docstring for how events, generations and fingerprints fit together."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksbpf.errors import BackendError, KsbpfError
from ksbpf.linux.layer import LayerName, LayerStatus
from ksbpf.linux.netns import netns
from ksbpf.linux.nftables import NftApply
from ksbpf.linux.nftgen import gen_after
from ksbpf.policy import Policy
from ksbpf.reconcile.probes import (
    LinkState,
    cgroup_id_or_none,
    cgroup_mount,
    nft_listing,
    nft_listing_at_generation,
    read_links,
    resolve_cgroup,
)
from ksbpf.reconcile.shape import NftShape, fingerprint, shape_of
from ksbpf.reconcile.watchers import NftWatcher
from ksbpf.verdict import interface_matches

if TYPE_CHECKING:  # the engine brings the layers (the BPF one heavy): the daemon imports it first
    from ksbpf.linux.engine import LinuxEngine

log = logging.getLogger("ksbpf.reconcile")


class ExternalDown(KsbpfError):
    """The layers went away together with the applied-policy record: `ksctl down`."""


class Reconciler:
    """Owns the expectations for one engine and repairs drift. Not thread-safe: the
    daemon calls it from its main loop only. `snapshot_*` fields are read by metrics."""

    def __init__(self, engine: LinuxEngine, *, bpf: bool = True, settle_s: float = 0.3) -> None:
        self.engine = engine
        self.netns: str | None = engine.netns
        self.bpf_wanted = bpf
        self.settle_s = settle_s
        self.policy: Policy | None = None  # effective: file + run-time exemptions
        self.links = LinkState({}, {})
        self.drift_repairs: dict[str, int] = {LayerName.NFTABLES: 0, LayerName.ROUTING: 0, LayerName.BPF: 0}
        self.layers: dict[str, bool] = {}
        self.bpf_engaged = False
        self.cgroup_ids: dict[str, int | None] = {}
        self._cgroup_dirs: dict[str, Path | None] = {}  # exempt or endpoint cgroup -> its directory
        self._expected: tuple[tuple[int, tuple[tuple[int, str], ...]], NftShape] | None = None
        self._fingerprint: str | None = None
        self._fingerprint_gen: int | None = None  # the nftables generation it was taken at
        # ksbpf changed exemption sets since the fingerprint; the next nft check takes a new one
        self.fingerprint_stale = False
        self.nft_watcher: NftWatcher | None = None  # set by the daemon; without it every change is listed at once
        self._applied_uplinks: dict[int, str] = {}
        self.last_tunnel_follow_s: float | None = None

    # ------------------------------------------------------------------ expectations

    def engaged(self, effective: Policy, layers: dict[str, LayerStatus]) -> tuple[list[Path], list[Path]] | None:
        """After the engine engaged (or re-engaged) `effective`: take it as the truth.
        The first time, every cgroup is resolved (watch all of cgroup_dirs()) and None is
        returned. A re-engage (reload) is O(changed) like exemptions_changed when nftables
        took set element changes only, and returns the directories to watch now and those
        no longer to watch."""
        first = self.policy is None
        self.layers = {n: bool(s.engaged) for n, s in layers.items()}
        self.bpf_engaged = self.layers.get(LayerName.BPF, False)
        with netns(self.netns):
            self.links = read_links(effective)
        self._applied_uplinks = dict(self.links.uplinks)
        if first:
            self.policy = effective
            self._expected = None
            self._snapshot_nft()
            self.cgroup_ids = self._resolve_cgroups()
            return None
        by_changes = self.engine.nft.last_apply in (NftApply.CHANGES, NftApply.UNCHANGED)
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
            mount = cgroup_mount()
            for path in added:
                d, cid = resolve_cgroup(path, mount)
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
            gen, listing = nft_listing_at_generation()
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
                out[path] = cgroup_id_or_none(d)
                continue
            if not have_mount:
                mount, have_mount = cgroup_mount(), True
            dirs[path], out[path] = resolve_cgroup(path, mount)
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
            gen, listing = nft_listing_at_generation() if stale else (None, nft_listing())
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
        self.drift_repairs[LayerName.NFTABLES] += 1
        self.layers[LayerName.NFTABLES] = True
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
            self.layers[LayerName.ROUTING] = True
            return None
        if not self._confirm_drift(lambda: self.routing_drift() is not None):
            return None
        assert self.policy is not None
        what = self.routing_drift() or what
        try:
            self.engine.routing.apply(self.policy)
        except BackendError:
            was = self.layers.get(LayerName.ROUTING, False)
            self.layers[LayerName.ROUTING] = False
            if was:
                raise
            return None
        self.drift_repairs[LayerName.ROUTING] += 1
        self.layers[LayerName.ROUTING] = True
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
        self.drift_repairs[LayerName.BPF] += 1
        self.layers[LayerName.BPF] = True
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
                    now[path] = cgroup_id_or_none(d)
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


def _at_or_below(d: Path, under: tuple[Path, ...] | list[Path]) -> bool:
    s = str(d)
    for u in under:
        us = str(u)
        if s == us or s.startswith(us + "/"):
            return True
    return False
