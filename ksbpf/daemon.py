"""ksbpfd: the service that engages the kill switch and keeps it true.

    ksbpfd --config FILE [--netns NAME] [--state-dir DIR] [--no-bpf]

Start: the policy is validated (a file writable by anyone but root is refused), the
metrics endpoint and the control socket are bound, every layer is engaged (nftables
first), the boot-time lockdown table is removed, and only then READY=1. A policy that
fails to validate at start falls back to the last applied one when there is one.

Then a main loop owns every change: watcher events (links, rules, nftables, cgroups),
control requests, SIGHUP (RELOADING=1, reload, READY=1; a bad policy is refused and the
one in force stays), periodic checks, WATCHDOG=1. Stopping (SIGTERM) or dying leaves
enforcement in the kernel: only `ksctl down` removes it.

An exempt/unexempt request costs the engine's own update and O(changed) bookkeeping: it
is answered once the kernel holds the change; what grows with the number of exemptions
(the ruleset's new fingerprint, the STATUS line's drop counters) runs after requests
pause for a second (FINGERPRINT_AFTER_S, STATUS_AFTER_S), never on a request's path.

The daemon runs in the host's mount and network namespace (cgroups, bpffs, the metrics
endpoint and the control socket live there); with --netns the network-side work happens
in that namespace, from threads that enter it themselves.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ParamSpec

from ksbpf import __version__
from ksbpf.errors import BackendError, KsbpfError, PolicyError
from ksbpf.linux.layer import LayerName
from ksbpf.policy import DEFAULT_POLICY_PATH, Policy, PolicyParser, loads_policy
from ksbpf.policy_file import read_policy_file
from ksbpf.service import Notifier, setup_logging

if TYPE_CHECKING:  # each imported when the daemon first needs it (the heavy ones: prometheus, BPF)
    from ksbpf.control import ControlServer
    from ksbpf.linux.events import DropEventPump
    from ksbpf.metrics import DropSample, MetricsServer, Snapshot
    from ksbpf.policy import Exemption
    from ksbpf.reconcile.watchers import CgroupWatcher, Event, NetlinkWatcher, NftWatcher

log = logging.getLogger("ksbpfd")
P = ParamSpec("P")

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
# A Python dependency is missing (the log names its Debian package): restarting cannot help,
# units/ksbpf.service has it in RestartPreventExitStatus=. 5 is systemd's NOTINSTALLED and
# ksctl's code for the same failure.
EXIT_MISSING_DEPENDENCY = 5
LOCKDOWN_TABLE = "ksbpf_lockdown"
# The loader child's compile timeout (ksbpf.linux.bpf) plus the time to load and attach.
COMPILE_BOUND_S = 330.0
TRANSIENT_RETRY_S = 2.0  # a reconciliation step that failed unexpectedly is retried this soon
BPF_RETRY_S = (30.0, 600.0)  # first retry of a BPF layer that failed to load, and the cap
# After a run-time exemption change, the nft check that takes the new fingerprint runs once
# no change came for this long (the listing is O(all elements); a burst of changes gets one).
FINGERPRINT_AFTER_S = 1.0
# systemd's STATUS after a control request: computed (drop counters: O(n) reads) once
# requests have stopped for this long, never on a request's path.
STATUS_AFTER_S = 1.0


# ------------------------------------------------------------------ the daemon


@dataclass
class ControlCall:
    request: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    error: BaseException | None = None
    # Whoever claims the call first decides its fate: the main loop (it runs) or the waiting
    # control thread (it gave up and answered "busy"; the call must then never run).
    _claim: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        return self._claim.acquire(blocking=False)


@dataclass(frozen=True)
class Signalled:
    """A signal, handed from its handler to the main loop."""

    signum: int


@dataclass
class Timer:
    interval: float
    due: float = 0.0

    def ready(self, now: float) -> bool:
        if now >= self.due:
            self.due = now + self.interval
            return True
        return False


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        from ksbpf.linux.engine import DEFAULT_STATE_DIR, LinuxEngine, state_dir_for
        from ksbpf.metrics import CgroupNames, Histogram
        from ksbpf.reconcile.reconciler import Reconciler

        self.args = args
        self.config = Path(args.config)
        self.parser = PolicyParser()  # a reload re-parses only what changed in the file
        self.netns: str | None = args.netns
        base = Path(args.state_dir) if args.state_dir else DEFAULT_STATE_DIR
        self.engine = LinuxEngine(netns=self.netns, state_dir=state_dir_for(self.netns, base), bpf=not args.no_bpf)
        self.engine.defer_bpf_cleanup = True  # run after each reply (_answer)
        self.rec = Reconciler(self.engine, bpf=not args.no_bpf, settle_s=args.settle)
        self.q: queue.SimpleQueue[Event | ControlCall | Signalled] = queue.SimpleQueue()
        self.notifier = Notifier()
        self.apply_seconds = Histogram()
        self.cgroup_names = CgroupNames()
        self.reloads = {"ok": 0, "refused": 0, "failed": 0}
        self.config_ok = True  # the last attempt to apply the policy file succeeded (metrics)
        self.config_applied_at = 0.0  # Unix time it last did
        self.base_policy: Policy | None = None
        self.layer_detail: dict[str, str] = {}
        self.enforcing = False
        self.stopping = False
        self.metrics: MetricsServer | None = None
        self.control: ControlServer | None = None
        self.watchers: list[NetlinkWatcher | NftWatcher | CgroupWatcher] = []
        self.cgroup_watcher: CgroupWatcher | None = None
        self.events: DropEventPump | None = None
        self.events_detail = "not reading"
        self._bpf_retry_at: float | None = None
        self._bpf_backoff = BPF_RETRY_S[0]
        self._nft_check_at: float | None = None  # a deferred nft check (new fingerprint) is due
        self._status_at: float | None = None  # a STATUS update is due
        self._dicts_of: tuple[tuple[Exemption, ...], list[dict[str, Any]]] | None = None  # (exemptions, as dicts) for status
        self._last_note = ""
        self._transient_retry_at: float | None = None  # a full check after a failed step

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> int:
        self._install_signals()
        policy, text = self._initial_policy()
        try:
            metrics = self._bind_metrics(policy)
        except OSError as e:
            return self._fail(f"metrics: cannot listen on {policy.metrics.listen}: {e.strerror or e}", EXIT_FAILED)
        from ksbpf.control import ControlServer, socket_path
        from ksbpf.linux.events import DropEventPump

        self.events = DropEventPump(logging.getLogger("ksbpf.events"), interval=self.args.event_interval)
        self.control = control = ControlServer(socket_path(self.netns), self._control_handler, hub=self.events.hub)
        try:
            control.bind()
        except (OSError, KsbpfError) as e:
            return self._fail(f"control socket: {e}", EXIT_FAILED)
        try:
            # Watchers first: a link that changes while we engage is an event, not a miss.
            self._start_watchers()
            self._engage(policy, text, why="start")
            if self.config_ok:
                self.config_applied_at = time.time()
        except KsbpfError as e:
            return self._fail(f"cannot engage: {e}", EXIT_FAILED)
        except Exception as e:  # a bug: still close the control socket and stop the watchers
            log.exception("cannot engage: internal error")
            return self._fail(f"cannot engage: internal error: {e}", EXIT_FAILED)
        metrics.start()
        control.start()
        log.info("ready: metrics on http://%s/metrics, control socket %s", metrics.listen, control.path)
        self.notifier.notify(READY=1, STATUS=self._status_text(), MAINPID=os.getpid())
        try:
            self._loop()
        finally:
            self._shutdown()
        return EXIT_OK

    def _fail(self, message: str, code: int) -> int:
        log.error("%s", message)
        self.notifier.notify(STATUS=f"failed: {message}")
        self._shutdown()
        return code

    def _install_signals(self) -> None:
        # SimpleQueue.put is reentrant: safe from a signal handler.
        def handler(signum: int, _frame: FrameType | None) -> None:
            self.q.put(Signalled(signum))

        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _initial_policy(self) -> tuple[Policy, str]:
        try:
            return read_policy_file(self.config, self.parser)
        except PolicyError as e:
            try:
                snapshot = self.engine.applied_policy_path.read_text()
                policy = loads_policy(snapshot, str(self.engine.applied_policy_path))
            except (OSError, KsbpfError):
                raise e from None
            log.error("%s; enforcing the last applied policy (%s) until a reload succeeds", e, self.engine.applied_policy_path)
            self._last_note = f"{self.config} refused: {e.reason}"
            self.config_ok = False
            return policy, snapshot

    def _bind_metrics(self, policy: Policy) -> MetricsServer:
        from ksbpf.metrics import KsbpfCollector, MetricsServer

        collector = KsbpfCollector(self.snapshot, [self._nft_drops, self._bpf_drops], self.apply_seconds)
        server = MetricsServer(collector, policy.metrics.host, policy.metrics.port)
        server.bind()
        old, self.metrics = self.metrics, server
        if old is not None:
            server.start()
            old.close()
        return server

    def _start_watchers(self) -> None:
        from ksbpf.reconcile.watchers import CgroupWatcher, NetlinkWatcher, NftWatcher

        emit = self.q.put
        nft_watcher = NftWatcher(self.netns, emit)
        for w in (NetlinkWatcher(self.netns, emit), nft_watcher):
            w.start_and_wait()
            self.watchers.append(w)
        # Its generation bookkeeping lets exemption changes skip listing the ruleset.
        self.rec.nft_watcher = nft_watcher
        self.cgroup_watcher = CgroupWatcher(emit)
        self.cgroup_watcher.start()
        self.watchers.append(self.cgroup_watcher)

    def _shutdown(self) -> None:
        self.stopping = True
        self.notifier.notify(STOPPING=1, STATUS="stopping; enforcement stays in the kernel")
        if self.events is not None:
            self.events.stop()  # ends the watch sessions, writes what the journal has not had
        if self.control is not None:
            self.control.close()
        self._fail_pending("ksbpfd is stopping")
        for w in self.watchers:
            w.stop()
        if self.metrics is not None:
            self.metrics.close()
        log.info("stopped; enforcement stays in the kernel (only `ksctl down` removes it)")

    def _fail_pending(self, why: str) -> None:
        while True:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, ControlCall):
                item.error = BackendError("control", why)
                item.done.set()

    # ---------------------------------------------------------------- engaging

    def _engage(self, policy: Policy, text: str, why: str) -> None:
        """Engage (or re-engage) every layer. Raises BackendError when nftables refused
        the ruleset (the one before stays, atomically); other layers' failures are
        reported and retried."""
        with self.notifier.keepalive(COMPILE_BOUND_S, starting=why == "start"):
            result = self.engine.up(policy, text)
        self.apply_seconds.observe(result.seconds)
        effective = self.engine.effective_policy(policy)
        self.base_policy = policy
        self.enforcing = True
        self.layer_detail = {n: s.detail for n, s in result.layers.items()}
        dirs = self.rec.engaged(effective, result.layers)
        self.cgroup_names.set_root(policy.bpf.cgroup)
        self.cgroup_names.set_mode(policy.metrics.cgroup_label)
        if self.cgroup_watcher is not None:
            if dirs is None:
                self.cgroup_watcher.watch(self.rec.cgroup_dirs())
            else:
                self.cgroup_watcher.change(*dirs)
        if self.rec.fingerprint_stale:
            self._nft_check_at = time.monotonic() + FINGERPRINT_AFTER_S
        for name, st in result.layers.items():
            level = logging.INFO if st.engaged or (name == LayerName.BPF and self.args.no_bpf) else logging.ERROR
            log.log(level, "%s: %s %s: %s", why, name, "engaged" if st.engaged else "NOT ENGAGED", st.detail,
                    extra={"KSBPF_LAYER": name, "KSBPF_EVENT": why})
        bpf_layer = self.engine.loaded_bpf_layer
        bpf_last = bpf_layer.last_apply if bpf_layer is not None else None
        bpf_how = (", ".join(bpf_last.writes) or bpf_last.replacement) if bpf_last is not None else "-"
        log.info("%s: policy %s applied in %.0f ms (nftables: %s; bpf: %s)", why, policy.source, result.seconds * 1000,
                 self.engine.nft.last_apply or "whole", bpf_how)
        self._bpf_retry_at = None
        self._follow_events()
        bpf = result.layers.get(LayerName.BPF)
        if not self.args.no_bpf and (bpf is None or not bpf.engaged):
            self._bpf_backoff = BPF_RETRY_S[0]
            self._bpf_retry_at = time.monotonic() + self._bpf_backoff
        self._remove_lockdown()
        # A 10,000-entry policy is a million objects; the cyclic collector would walk them
        # all on a full collection (tens of ms, on some later request). They are freed by
        # reference counting when replaced; only newer objects need the cyclic collector.
        gc.freeze()

    def _remove_lockdown(self) -> None:
        """units/ksbpf-lockdown.service blocked everything at boot with its own table; our
        table enforces now (both drop by default, so there is no gap), and it goes."""
        if not self.rec.layers.get(LayerName.NFTABLES):
            return
        from ksbpf.linux.netns import netns

        try:
            import nftables

            with netns(self.netns):
                nft = nftables.Nftables()
                nft.set_json_output(True)
                # Chains, not tables: libnftables answers `list tables` only after caching
                # every set element (80 ms at 10,000 exemptions). The lockdown table has chains.
                rc, out, _ = nft.cmd("list chains inet")
                chains = json.loads(out).get("nftables", []) if rc == 0 and out else []
                if any(o.get("chain", {}).get("table") == LOCKDOWN_TABLE for o in chains):
                    rc, _, err = nft.cmd(f"delete table inet {LOCKDOWN_TABLE}")
                    if rc != 0:
                        log.error("cannot remove the lockdown table: %s", err.strip())
                    else:
                        log.info("lockdown table inet %s removed: ksbpf enforces now", LOCKDOWN_TABLE)
        except (ImportError, KsbpfError) as e:
            log.error("cannot remove the lockdown table: %s", e)

    def _reload(self, origin: str) -> dict[str, Any]:
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6), STATUS=f"reloading ({origin})")
        try:
            try:
                policy, text = read_policy_file(self.config, self.parser)
            except PolicyError as e:
                self.reloads["refused"] += 1
                self.config_ok = False
                self._last_note = f"reload refused: {e}"
                log.error("reload (%s) refused: %s; the policy in force stays", origin, e,
                          extra={"KSBPF_EVENT": "reload-refused"})
                raise
            try:
                self._engage(policy, text, why=f"reload ({origin})")
            except KsbpfError as e:
                self.reloads["failed"] += 1
                self.config_ok = False
                self._last_note = f"reload failed: {e}"
                log.error("reload (%s) failed: %s; the ruleset in force stays", origin, e)
                raise
            self.reloads["ok"] += 1
            self.config_ok, self.config_applied_at = True, time.time()
            self._last_note = ""
            if self.metrics is not None and (policy.metrics.host, policy.metrics.port) != (self.metrics.host, self.metrics.port):
                try:
                    self._bind_metrics(policy)
                    log.info("metrics now on http://%s/metrics", self.metrics.listen)
                except OSError as e:
                    log.error("metrics stay on %s: cannot listen on %s: %s", self.metrics.listen, policy.metrics.listen, e)
            from ksbpf.sockmark import wanted_marks

            # ksctl marks the sockets these cgroups made before (this sandbox cannot).
            marks = wanted_marks(self.engine.effective_policy(policy))
            return {"layers": {n: {"engaged": s, "detail": self.layer_detail.get(n, "")} for n, s in self.rec.layers.items()},
                    "marks": marks}
        finally:
            self.notifier.notify(READY=1, STATUS=self._status_text())

    # ---------------------------------------------------------------- main loop

    def _loop(self) -> None:
        a = self.args
        timers = {
            "bpf": Timer(a.bpf_poll, time.monotonic() + a.bpf_poll),
            "check": Timer(a.check_interval, time.monotonic() + a.check_interval),
            "status": Timer(a.status_interval, time.monotonic() + a.status_interval),
        }
        if self.notifier.watchdog_s:
            timers["watchdog"] = Timer(self.notifier.watchdog_s / 2)
        while not self.stopping:
            now = time.monotonic()
            wake = min(t.due for t in timers.values())
            for due in (self._bpf_retry_at, self._nft_check_at, self._status_at, self._transient_retry_at):
                if due is not None:
                    wake = min(wake, due)
            items = []
            try:
                items.append(self.q.get(timeout=max(0.0, wake - now)))
                while True:
                    items.append(self.q.get_nowait())
            except queue.Empty:
                pass
            self._handle(items)
            now = time.monotonic()
            if self.stopping:
                break
            if timers.get("watchdog") and timers["watchdog"].ready(now):
                self.notifier.notify(WATCHDOG=1)
            if self._transient_retry_at is not None and now >= self._transient_retry_at:
                self._transient_retry_at = None
                timers["check"].due = now  # the full check below
            if self.enforcing:
                if timers["check"].ready(now):
                    self._nft_check_at = None
                    self._guard(self._full_check)
                    timers["bpf"].due = now + a.bpf_poll
                elif timers["bpf"].ready(now):
                    self._guard(self._report_repair, LayerName.BPF, self.rec.check_bpf)
                if self._bpf_retry_at is not None and now >= self._bpf_retry_at:
                    self._retry_bpf()
            if self._nft_check_at is not None and now >= self._nft_check_at:
                self._nft_check_at = None
                if self.rec.fingerprint_stale:  # a reload or repair may have taken one meanwhile
                    self._guard(self._report_repair, LayerName.NFTABLES, self.rec.check_nft)  # nothing when idle
            if timers["status"].ready(now) or (self._status_at is not None and now >= self._status_at):
                self._status_at = None
                self._push_status()

    def _handle(self, items: list[Event | ControlCall | Signalled]) -> None:
        from ksbpf.reconcile.watchers import Event, EventKind

        events = [i for i in items if isinstance(i, Event)]
        for item in items:
            if isinstance(item, Signalled):
                if item.signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading %s", self.config)
                    try:
                        self._reload("SIGHUP")
                    except KsbpfError:
                        pass  # _reload logged it; the policy in force stays
                    except Exception:  # a bug or a transient kernel error: the daemon stays
                        log.exception("SIGHUP: reload failed unexpectedly; the policy in force stays")
                else:
                    log.info("signal %d: stopping", item.signum)
                    self.stopping = True
            elif isinstance(item, ControlCall):
                self._answer(item)
        if self.stopping or not self.enforcing or not events:
            return
        kinds = {e.kind for e in events}
        overflow = EventKind.OVERFLOW in kinds
        for e in events:
            if e.kind == EventKind.OVERFLOW:
                log.warning("events lost (%s): checking everything", e.detail)
        # Links first, always (one dump): a check must judge against the current interfaces.
        since = min((e.at for e in events if e.kind in (EventKind.LINK, EventKind.OVERFLOW)), default=None)
        self._guard(self._links, since)
        if EventKind.NFT in kinds or overflow:
            self._guard(self._report_repair, LayerName.NFTABLES, self.rec.check_nft)
        if EventKind.ROUTING in kinds or overflow:
            self._guard(self._report_repair, LayerName.ROUTING, self.rec.check_routing)
        if EventKind.CGROUP in kinds or overflow:
            # Only the cgroups at or below what inotify saw made or removed, unless it lost count.
            seen = [e.paths for e in events if e.kind == EventKind.CGROUP]
            under = None if overflow or any(p is None for p in seen) else tuple(p for ps in seen for p in ps or ())
            self._guard(self._cgroups, under)

    def _guard(self, fn: Callable[P, object], *args: P.args, **kwargs: P.kwargs) -> None:
        """Run one reconciliation step: `ksctl down` makes the daemon idle, a failure is
        logged and retried at the next event or check."""
        from ksbpf.reconcile.reconciler import ExternalDown

        if not self.enforcing:
            return
        try:
            fn(*args, **kwargs)
        except ExternalDown as e:
            self.enforcing = False
            self._bpf_retry_at = None
            self._last_note = "idle: enforcement removed by `ksctl down`"
            log.warning("%s; idle until a reload (SIGHUP) or restart", e, extra={"KSBPF_EVENT": "down"})
            # A repair racing the down may have put a layer back: finish what `down` began.
            try:
                self.engine.down()
            except KsbpfError as err:
                log.error("completing `ksctl down` failed: %s", err)
            self._push_status()
        except KsbpfError as e:
            log.error("reconciling failed: %s (retrying at the next event or check)", e)
        except Exception as e:
            # pyroute2's NetlinkDumpInterrupted (links changed during a dump), an OSError such
            # as EMFILE, or a bug: none may end the daemon, which alone follows the tunnel and
            # repairs drift. Logged with its traceback, and everything is checked again soon.
            log.exception("reconciling failed unexpectedly (%s); checking everything again in %.0f s",
                          type(e).__name__, TRANSIENT_RETRY_S)
            self._retry_check_soon()

    def _retry_check_soon(self) -> None:
        self._transient_retry_at = time.monotonic() + TRANSIENT_RETRY_S

    def _links(self, since: float | None) -> None:
        done = self.rec.on_links(since)
        for line in done:
            log.info("%s", line, extra={"KSBPF_EVENT": "link"})
        if done:
            self._push_status()

    def _report_repair(self, layer: LayerName, check: Callable[[], str | None]) -> None:
        if layer == LayerName.BPF:
            with self.notifier.keepalive(COMPILE_BOUND_S):  # repairing BPF may compile again
                what = check()
        else:
            what = check()  # milliseconds: no helper thread
        if what:
            log.warning("drift repaired in %s: %s", layer, what, extra={"KSBPF_LAYER": layer, "KSBPF_EVENT": "drift"})
            self._push_status()

    def _cgroups(self, under: tuple[Path, ...] | None = None) -> None:
        """Cgroups at or below `under` (all: None) may have been made or removed."""
        for change in self.rec.check_cgroups(under):
            log.info("exemption follows its cgroup: %s", change, extra={"KSBPF_EVENT": "cgroup"})
        if self.cgroup_watcher is not None:
            if under is None:
                self.cgroup_watcher.watch(self.rec.cgroup_dirs())
            else:
                self.cgroup_watcher.refresh(self.rec.cgroup_dirs(under))

    def _full_check(self) -> None:
        self._links(time.monotonic())
        self._report_repair(LayerName.NFTABLES, self.rec.check_nft)
        self._report_repair(LayerName.ROUTING, self.rec.check_routing)
        self._report_repair(LayerName.BPF, self.rec.check_bpf)
        self._cgroups()
        self._follow_events()

    def _follow_events(self) -> None:
        """Read the BPF layer's drop-event ring buffer; again when a load made another."""
        if self.events is None or self.args.no_bpf or not self.rec.layers.get(LayerName.BPF) or self.rec.policy is None:
            return
        try:
            layer = self.engine.bpf_layer(self.rec.policy)
        except ImportError:
            return
        why = self.events.ensure(layer.dir)
        if why and why not in self.events_detail:
            log.warning("drop events: %s", why, extra={"KSBPF_EVENT": "events"})
        self.events_detail = f"not reading: {why}" if why else layer.events_detail()

    def _retry_bpf(self) -> None:
        policy = self.rec.policy
        assert policy is not None
        try:
            layer = self.engine.bpf_layer(policy)
            with self.notifier.keepalive(COMPILE_BOUND_S):
                layer.apply(policy)
            engaged, detail = layer.status()
        except (ImportError, KsbpfError) as e:
            engaged, detail = False, str(e)
        self.layer_detail[LayerName.BPF] = detail
        if engaged:
            self.rec.layers[LayerName.BPF] = self.rec.bpf_engaged = True
            self._bpf_retry_at = None
            self._follow_events()
            log.info("bpf: engaged on retry: %s", detail)
        else:
            self._bpf_backoff = min(self._bpf_backoff * 2, BPF_RETRY_S[1])
            self._bpf_retry_at = time.monotonic() + self._bpf_backoff
            log.warning("bpf: still not engaged (%s); next try in %.0f s", detail, self._bpf_backoff)

    # ---------------------------------------------------------------- control

    def _control_handler(self, request: dict[str, Any]) -> dict[str, Any]:
        """Runs on the control thread: the main loop does the work."""
        from ksbpf.control import REPLY_TIMEOUT

        if self.stopping:
            raise BackendError("control", "ksbpfd is stopping")
        call = ControlCall(request)
        self.q.put(call)
        if not call.done.wait(REPLY_TIMEOUT - 5) and call.claim():
            # Not started yet, and now it never will: "busy" means nothing was done.
            raise BackendError("control", "ksbpfd is busy; nothing was changed; try again")
        call.done.wait()  # the main loop claimed it first: its answer is the true one
        if call.error is not None:
            raise call.error
        return call.reply or {}

    def _answer(self, call: ControlCall) -> None:
        if not call.claim():
            log.info("control: %s request given up by its client as busy; not run", call.request["op"])
            return
        req = call.request
        op = req["op"]
        try:
            if op == "status":
                call.reply = self.status(brief=bool(req.get("brief")))
            elif op == "exempt":
                from ksbpf.linux.cgroup import cgroup_dir

                ex = req["exemption"]
                cgroup_dir(ex.cgroup)  # refuses a path escaping the cgroup2 mount: nothing changed yet
                if not self.enforcing:
                    raise KsbpfError("ksbpf is not engaged (after `down`); reload first")
                effective = self.engine.set_exemption(ex)
                self._exemptions_changed(effective)
                log.info("exempted %s: %s", ex.cgroup, ex.as_dict(), extra={"KSBPF_EVENT": "exempt"})
                from ksbpf.sockmark import wanted_marks

                # The one mark ksctl gives the sockets this cgroup already has (not this sandbox).
                mark = wanted_marks(effective).get(ex.cgroup)
                call.reply = {"exemption": ex.as_dict(), "marks": {ex.cgroup: mark} if mark else {}}
            elif op == "unexempt":
                if not self.enforcing:
                    raise KsbpfError("ksbpf is not engaged (after `down`); reload first")
                effective = self.engine.remove_exemption(req["cgroup"])
                self._exemptions_changed(effective)
                log.info("removed the exemption of %s", req["cgroup"], extra={"KSBPF_EVENT": "unexempt"})
                call.reply = {"cgroup": req["cgroup"]}
            elif op == "reload":
                asked = req.get("config")
                if asked is not None and os.path.realpath(asked) != os.path.realpath(self.config):
                    # Applying another file under a running daemon would be undone as drift.
                    raise PolicyError(f"ksbpfd enforces {self.config}, not {asked}: edit that file and run "
                                      "`ksctl reload`, or stop ksbpfd to apply another file directly",
                                      source="ksctl up", key="--config")
                call.reply = self._reload("ksctl up" if asked is not None else "ksctl")
            elif op == "down":
                self.engine.down()
                self.enforcing = False
                self.rec.layers = {}
                self._bpf_retry_at = None
                self._last_note = "idle: enforcement removed by `ksctl down`"
                log.warning("down: every layer removed on request; idle until a reload (SIGHUP) or restart",
                            extra={"KSBPF_EVENT": "down"})
                call.reply = {}
            else:  # validate_request admits only the ops above
                raise PolicyError(f"unknown op {op!r}", source="control request")
        except BaseException as e:  # handed to the waiting control thread, which reports it
            call.error = e
        finally:
            call.done.set()
        # Off the request's path: the old BPF entries' grace period, the drop counters.
        self._guard(self.engine.finish_bpf_cleanup)
        self._status_soon()

    def _exemptions_changed(self, effective: Policy) -> None:
        """O(changed): the cgroups that came or went are resolved and (un)watched; the
        fingerprint of the ruleset is taken by an nft check once changes pause."""
        added, removed = self.rec.exemptions_changed(effective)
        if self.cgroup_watcher is not None:
            self.cgroup_watcher.change(added, removed)
        if self.rec.fingerprint_stale:
            self._nft_check_at = time.monotonic() + FINGERPRINT_AFTER_S

    # ---------------------------------------------------------------- reporting

    def _nft_drops(self) -> list[DropSample]:
        from ksbpf.metrics import nft_drop_samples

        return nft_drop_samples(self.engine.nft)

    def _bpf_drops(self) -> list[DropSample]:
        from ksbpf.metrics import bpf_drop_samples

        if self.args.no_bpf:
            return []
        try:
            layer = self.engine.bpf_layer(self.rec.policy)
        except ImportError:
            return []
        return bpf_drop_samples(layer, self.cgroup_names)

    def snapshot(self) -> Snapshot:
        """For the metrics collector (HTTP threads): copies, never live references."""
        from ksbpf.metrics import Snapshot

        policy = self.rec.policy
        return Snapshot(
            layers=dict(self.rec.layers) if self.enforcing else {},
            tunnels=self.rec.tunnel_state(),
            exemptions=len(policy.exemptions) if policy is not None and self.enforcing else 0,
            drift_repairs=dict(self.rec.drift_repairs),
            reloads=dict(self.reloads),
            engaged=self.enforcing,
            config_ok=self.config_ok,
            config_applied_at=self.config_applied_at,
            drop_events_lost=self._events_lost(),
        )

    def _events_lost(self) -> int | None:
        if self.args.no_bpf or self.rec.policy is None:
            return None
        try:
            return int(self.engine.bpf_layer(self.rec.policy).events_lost())
        except (ImportError, KsbpfError):
            return None

    def _recent_drops(self) -> dict[str, Any]:
        return {"drop_events": self.events_detail,
                "recent_drops": self.events.recent() if self.events is not None else []}

    def status(self, brief: bool = False) -> dict[str, Any]:
        """`brief`: without the lists that grow with the exemptions (`ksctl status` shows
        only their count; 10,000 of them are a megabyte of JSON)."""
        layers = {n: s.as_dict() for n, s in self.engine.status().items()}
        policy = self.rec.policy
        if brief:
            return {
                "layers": layers,
                "pid": os.getpid(),
                "version": __version__,
                "enforcing": self.enforcing,
                "netns": self.netns,
                "tunnels": self.rec.tunnel_state(),
                "exemption_count": len(policy.exemptions) if policy is not None else 0,
                "drift_repairs": dict(self.rec.drift_repairs),
                "note": self._last_note,
                **self._recent_drops(),
            }
        return {
            "layers": layers,
            "pid": os.getpid(),
            "version": __version__,
            "enforcing": self.enforcing,
            "policy": str(self.config),
            "netns": self.netns,
            "tunnels": self.rec.tunnel_state(),
            "exemptions": self._exemption_dicts(policy),
            "cgroup_ids": self.rec.cgroup_ids,
            # ksbpf changed exemptions since the ruleset's fingerprint: the next nft check takes one
            "nft_fingerprint_pending": self.rec.fingerprint_stale,
            "drift_repairs": dict(self.rec.drift_repairs),
            "reloads": dict(self.reloads),
            "last_tunnel_follow_ms": None if self.rec.last_tunnel_follow_s is None else round(self.rec.last_tunnel_follow_s * 1000, 2),
            "metrics": f"http://{self.metrics.listen}/metrics" if self.metrics is not None else None,
            "note": self._last_note,
            **self._recent_drops(),
        }

    def _exemption_dicts(self, policy: Policy | None) -> list[dict[str, Any]]:
        """As status shows them: rebuilt only when the exemptions changed."""
        if policy is None:
            return []
        if self._dicts_of is None or self._dicts_of[0] is not policy.exemptions:
            self._dicts_of = (policy.exemptions, [e.as_dict() for e in policy.exemptions])
        return self._dicts_of[1]

    def _status_soon(self) -> None:
        if self.notifier.active:
            self._status_at = time.monotonic() + STATUS_AFTER_S

    def _push_status(self) -> None:
        if self.notifier.active:
            self.notifier.status(self.status_line())

    def _status_text(self) -> str:
        return self.status_line() if self.notifier.active else ""

    def status_line(self) -> str:
        """One line for `systemctl status`: layers, tunnel, drops, repairs."""
        if not self.enforcing:
            return self._last_note or "not enforcing"
        layers = self.rec.layers
        engaged = [n for n in LayerName if layers.get(n)]
        missing = [n for n in LayerName if not layers.get(n) and not (n == LayerName.BPF and self.args.no_bpf)]
        parts = ["enforcing: " + "+".join(engaged) + (f" (NOT ENGAGED: {', '.join(missing)})" if missing else "")]
        tunnels = self.rec.tunnel_state()
        up = sorted(n for n, u in tunnels.items() if u)
        parts.append(f"tunnel {', '.join(up)} up" if up else "tunnel down: blocking everything")
        try:
            dropped = sum(s.packets for s in (*self._nft_drops(), *self._bpf_drops()))
            parts.append(f"{dropped} packets dropped")
        except Exception as e:  # the status line must never take the loop down
            log.debug("status line: drop counters unreadable: %s", e)
        repairs = sum(self.rec.drift_repairs.values())
        if repairs:
            parts.append(f"{repairs} drift repairs")
        if self._last_note:
            parts.append(self._last_note)
        return "; ".join(parts)


# ------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksbpfd", description="ksbpf daemon: engage the kill switch and keep it true")
    p.add_argument("--version", action="version", version=f"ksbpfd {__version__}")
    p.add_argument("--config", default=str(DEFAULT_POLICY_PATH), help="policy file (default %(default)s)")
    p.add_argument("--netns", metavar="NAME", help="enforce in this named network namespace")
    p.add_argument("--state-dir", metavar="DIR", help="state directory (default /var/lib/ksbpf)")
    p.add_argument("--no-bpf", action="store_true", help="engage nftables and routing only")
    p.add_argument("--check-interval", type=float, default=30.0, metavar="S",
                   help="full drift check backstop period (default %(default)s s)")
    p.add_argument("--bpf-poll", type=float, default=1.0, metavar="S",
                   help="BPF attachment check period; the kernel sends no event (default %(default)s s)")
    p.add_argument("--status-interval", type=float, default=5.0, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--settle", type=float, default=0.3, metavar="S",
                   help="wait this long before repairing drift, so `ksctl down` is told from drift")
    p.add_argument("--event-interval", type=float, default=10.0, metavar="S",
                   help="the journal gets one line per process, destination and drop reason per this many "
                        "seconds, with a count (default %(default)s)")
    p.add_argument("--log-target", choices=["auto", "journal", "stderr"], default="auto",
                   help="where to log (default %(default)s: the journal when systemd runs ksbpfd, else stderr)")
    return p


# What ksbpfd imports on its way, imported up front: the nftables and routing layers, the
# metrics endpoint, sd_notify (without it Type=notify would only time out); BCC unless --no-bpf.
REQUIRED_MODULES = ("nftables", "pyroute2", "prometheus_client", "systemd.daemon")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_target)
    from ksbpf.deps import MissingDependency, load_library, locate, require

    try:  # before anything else: one clear start failure, not a traceback or a restart loop
        require(*REQUIRED_MODULES)
        if not args.no_bpf:
            locate("bcc", hint="(or run ksbpfd --no-bpf)")
            load_library("libbpf.so.1", hint="(or run ksbpfd --no-bpf)")
    except MissingDependency as e:
        log.error("cannot start: %s", e)
        Notifier().notify(STATUS=f"cannot start: {e}")
        return EXIT_MISSING_DEPENDENCY
    if os.geteuid() != 0:
        log.error("ksbpfd must run as root (nftables, routing, BPF)")
        return EXIT_FAILED
    try:
        daemon = Daemon(args)
        return daemon.run()
    except PolicyError as e:
        log.error("refusing to start: %s", e)
        Notifier().notify(STATUS=f"refusing to start: {e}")
        return EXIT_BAD_CONFIG
    except KsbpfError as e:
        log.error("cannot start: %s", e)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
