"""Prometheus metrics of the daemon: a custom collector, read at scrape time.

Drop counters come straight from the kernel on every scrape: the named nft counters
(one counter-object dump per table, never a ruleset listing) and the pinned BPF drop map. Everything else
(layers engaged, tunnel links, exemptions, apply durations, drift repairs) is state the
daemon keeps current from events and checks, handed over as a snapshot.

Labels of the drop counters: `layer` (nftables, bpf), `reason` (ksbpf.verdict.Reason),
`family` (ipv4, ipv6; empty for BPF, whose counters are per reason and cgroup only) and
`cgroup`: empty for nftables, which cannot tell; for BPF as the policy's
`[metrics] cgroup_label` says (see CgroupNames): the cgroup's path relative to the cgroup2
mount ("cgroup"), that path cut to its slice or named service ("slice", the default, so that
a host making a scope per session, container or cron job keeps a bounded set of series), or
nothing ("none"); "(overflow)" for drops counted after the BPF map filled up, "(gone)" for
cgroups that were removed (in "cgroup" mode) or never seen.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ksbpf import __version__

log = logging.getLogger("ksbpf.metrics")

LAYERS = ("nftables", "routing", "bpf")
FAMILY_LABEL = {4: "ipv4", 6: "ipv6"}
# Engaging takes milliseconds for nftables and about a second with a BPF compile.
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OVERFLOW_CGROUP = "(overflow)"
GONE_CGROUP = "(gone)"
CGROUP_LABEL_MODES = ("cgroup", "slice", "none")


@dataclass(frozen=True)
class DropSample:
    layer: str
    reason: str
    family: str
    cgroup: str
    packets: int
    bytes: int


class Histogram:
    """A thread-safe histogram the collector exposes as a HistogramMetricFamily."""

    def __init__(self, buckets: Sequence[float] = APPLY_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets as (le, count), ending with +Inf, and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            acc += n
            out.append((bound, float(acc)))
        return out, total


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass
class Snapshot:
    """What the daemon knows, as of its last event or check."""

    layers: dict[str, bool] = field(default_factory=dict)
    tunnels: dict[str, bool] = field(default_factory=dict)  # interface (or unmatched glob) -> up
    exemptions: int = 0
    drift_repairs: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)  # result -> count
    engaged: bool = True  # False after `down` through the control socket
    # Did the last attempt to apply the policy file (start, SIGHUP, ksctl reload) succeed, and
    # when (Unix time) did one last succeed (0: never, e.g. the file was refused at start and
    # the last applied policy enforces). As Prometheus's own *_config_last_reload_*.
    config_ok: bool = True
    config_applied_at: float = 0.0
    # Drop events the BPF ring buffer had no room for (None: no BPF layer to ask).
    drop_events_lost: int | None = None


def slice_label(path: str) -> str:
    """The "slice" label of a cgroup path (relative to the cgroup2 mount): its first
    component, and below system.slice also the second when that is a named unit, a
    `.service` or a `.slice`. What systemd makes per session, container, VM or command
    (`.scope` units, systemd-run's `run-*.service`, instances `name@x.service` directly under
    system.slice) is folded into its top slice. So:
    system.slice/sshd.service -> itself; system.slice/system-getty.slice/getty@tty1.service
    -> system.slice/system-getty.slice; system.slice/docker-<id>.scope -> system.slice;
    user.slice/user-1000.slice/session-3.scope -> user.slice; init.scope -> itself; the
    root -> "/"; a layout not made by systemd (a/b/c) -> its top directory (a)."""
    parts = [c for c in path.split("/") if c]
    if not parts:
        return "/"
    if parts[0] == "system.slice" and len(parts) > 1 and _named_unit(parts[1]):
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


def _named_unit(name: str) -> bool:
    if name.endswith(".slice"):
        return True
    return name.endswith(".service") and "@" not in name and not name.startswith("run-")


class CgroupNames:
    """cgroup id -> the `cgroup` label of its BPF drop counters, by `mode`:

    - "slice" (default): slice_label() of the path. A cgroup keeps its label after it is
      removed (its counters stay in the map under its id), so its series neither moves nor
      jumps when it goes, and a host that makes thousands of scopes has a few dozen series.
    - "cgroup": the whole path while the cgroup exists; once a walk of the tree no longer
      finds it, its counts are folded into "(gone)", so series of removed cgroups end
      instead of piling up (the "(gone)" series steps up by their totals when they fold).
    - "none": always empty: one series per layer and reason.

    An id none of our walks ever found (made and removed between two) is "(gone)" too. The
    tree is walked when an id is not known yet (and in "cgroup" mode to notice removals), at
    most once per `refresh_s`; an id first met less than that after a walk is left out of
    that scrape (None), to be named by the next walk rather than counted as "(gone)" and then
    moved to its name, which would make "(gone)" go down. What is remembered is bounded by
    the ids the counters hold (labels() forgets the rest) plus the live tree."""

    def __init__(self, under: str = "", refresh_s: float = 5.0, mount: Path | None = None, mode: str = "slice") -> None:
        if mode not in CGROUP_LABEL_MODES:
            raise ValueError(f"cgroup label mode must be one of {', '.join(CGROUP_LABEL_MODES)}, not {mode!r}")
        self.under = under
        self.refresh_s = refresh_s
        self.mount = mount
        self.mode = mode
        self._paths: dict[int, str] = {}  # id -> path, of live cgroups and of counted gone ones
        self._live: set[int] = set()  # ids the last walk found
        self._unknown_since: dict[int, float] = {}  # ids no walk found yet -> when first asked for
        self._walked = float("-inf")  # when the last walk began, for refresh_s
        self._found_at = float("-inf")  # when the last walk that succeeded began
        self._lock = threading.Lock()

    def set_root(self, under: str) -> None:
        with self._lock:
            if under != self.under:
                self.under = under
                self._walked = float("-inf")

    def set_mode(self, mode: str) -> None:
        if mode not in CGROUP_LABEL_MODES:
            raise ValueError(f"cgroup label mode must be one of {', '.join(CGROUP_LABEL_MODES)}, not {mode!r}")
        with self._lock:
            self.mode = mode

    def name(self, cgroup_id: int) -> str | None:
        """The label of one id (None: not resolved yet, leave it out for now)."""
        with self._lock:
            return self._labels([cgroup_id])[0]

    def labels(self, ids: Sequence[int]) -> list[str | None]:
        """The labels of the ids a scrape read, in order; then forget every gone cgroup
        that is not among them."""
        with self._lock:
            out = self._labels(ids)
            keep = set(ids)
            self._paths = {i: p for i, p in self._paths.items() if i in keep or i in self._live}
            self._unknown_since = {i: t for i, t in self._unknown_since.items() if i in keep}
            return out

    def _labels(self, ids: Sequence[int]) -> list[str | None]:
        if self.mode == "none":
            return ["" for _ in ids]
        now = time.monotonic()
        unknown = False
        for i in ids:
            if i and i not in self._paths:
                self._unknown_since.setdefault(i, now)
                unknown = True
        if (unknown or (self.mode == "cgroup" and any(ids))) and now - self._walked >= self.refresh_s:
            self._walk()
        return [self._label(i) for i in ids]

    def _label(self, cgroup_id: int) -> str | None:
        if cgroup_id == 0:
            return OVERFLOW_CGROUP
        path = self._paths.get(cgroup_id)
        if path is None:
            # Gone if a walk that began after we first met the id did not find it.
            return GONE_CGROUP if self._found_at >= self._unknown_since.get(cgroup_id, float("inf")) else None
        if self.mode == "slice":
            return slice_label(path)
        return path if cgroup_id in self._live else GONE_CGROUP

    def _walk(self) -> None:
        from ksbpf.errors import KsbpfError
        from ksbpf.linux.cgroup import ids_by_path

        # Before the walk: an id made during it may be missed, and must not count as gone.
        started = self._walked = time.monotonic()
        try:
            found = ids_by_path(self.mount, self.under)
        except (KsbpfError, OSError) as e:
            log.warning("cannot resolve cgroup ids for metrics: %s", e)
            return  # nothing is called gone by a walk that failed
        self._found_at = started
        self._live = set(found.values())
        # Paths of cgroups that went away stay (their counters still carry the old id).
        self._paths.update({i: (p or "/") for p, i in found.items()})
        for i in self._live:
            self._unknown_since.pop(i, None)


def nft_drop_samples(nft: Any) -> list[DropSample]:
    """From NftLayer.drops(): (reason, family, packets, bytes) per named counter."""
    return [
        DropSample("nftables", str(getattr(reason, "value", reason)), FAMILY_LABEL.get(fam, str(fam)), "", int(p), int(b))
        for reason, fam, p, b in nft.drops()
    ]


def bpf_drop_samples(bpf: Any, names: CgroupNames) -> list[DropSample]:
    """From BpfLayer.counters(): (reason, cgroup id, packets, bytes) from the pinned map,
    labelled by `names` (ids not resolved yet are left out of this scrape)."""
    rows = [(str(reason), int(cg), int(p), int(b)) for reason, cg, p, b in bpf.counters()]
    labels = names.labels([cg for _, cg, _, _ in rows])
    return [DropSample("bpf", reason, "", label, p, b)
            for (reason, _cg, p, b), label in zip(rows, labels, strict=True) if label is not None]


def merge_samples(samples: Iterable[DropSample]) -> list[DropSample]:
    """Several cgroup ids may resolve to one label (a cgroup recreated under its path, the
    cgroups of one slice, the gone ones): one series per label set, their sum."""
    acc: dict[tuple[str, str, str, str], list[int]] = {}
    for s in samples:
        v = acc.setdefault((s.layer, s.reason, s.family, s.cgroup), [0, 0])
        v[0] += s.packets
        v[1] += s.bytes
    return [DropSample(*k, *v) for k, v in sorted(acc.items())]


class KsbpfCollector:
    """The daemon's collector. `drops` is called on every scrape and reads the kernel;
    `state` returns the daemon's current Snapshot; both must be safe to call from the
    HTTP server's threads. A failing reader drops its series and logs, the scrape goes on
    (ksbpf_scrape_errors_total says so)."""

    def __init__(
        self,
        state: Callable[[], Snapshot],
        drops: Iterable[Callable[[], Iterable[DropSample]]],
        apply_seconds: Histogram,
    ) -> None:
        self._state = state
        self._drops = list(drops)
        self._apply = apply_seconds
        self._errors = 0
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        # Nothing to pre-register: the registry must not call collect() (and touch the kernel)
        # when the collector is registered.
        return []

    def _read_drops(self) -> list[DropSample]:
        out: list[DropSample] = []
        for read in self._drops:
            try:
                out.extend(read())
            except Exception as e:  # one broken reader must not fail the scrape
                with self._lock:
                    self._errors += 1
                log.warning("metrics: reading drop counters failed: %s", e)
        return merge_samples(out)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        labels = ["layer", "reason", "family", "cgroup"]
        packets = CounterMetricFamily(
            "ksbpf_dropped_packets", "Packets ksbpf dropped, by layer, reason, address family and cgroup.", labels=labels
        )
        nbytes = CounterMetricFamily(
            "ksbpf_dropped_bytes", "Bytes ksbpf dropped, by layer, reason, address family and cgroup.", labels=labels
        )
        for s in self._read_drops():
            key = [s.layer, s.reason, s.family, s.cgroup]
            packets.add_metric(key, s.packets)
            nbytes.add_metric(key, s.bytes)
        yield packets
        yield nbytes

        st = self._state()
        engaged = GaugeMetricFamily("ksbpf_layer_engaged", "1 when the enforcement layer is in place.", labels=["layer"])
        for layer in LAYERS:
            engaged.add_metric([layer], 1.0 if st.layers.get(layer) else 0.0)
        yield engaged

        tunnel = GaugeMetricFamily(
            "ksbpf_tunnel_up", "1 when the tunnel interface exists and is up (0: traffic is blocked).", labels=["interface"]
        )
        for name, up in sorted(st.tunnels.items()):
            tunnel.add_metric([name], 1.0 if up else 0.0)
        yield tunnel

        yield GaugeMetricFamily("ksbpf_exemptions", "Exemptions in force (policy and run-time).", value=st.exemptions)

        buckets, total = self._apply.snapshot()
        hist = HistogramMetricFamily("ksbpf_policy_apply_seconds", "Time to engage or re-engage every layer.")
        hist.add_metric([], buckets, total)
        yield hist

        drift = CounterMetricFamily(
            "ksbpf_drift_repairs", "Changes made behind ksbpf's back that it repaired, by layer.", labels=["layer"]
        )
        for layer in LAYERS:
            drift.add_metric([layer], st.drift_repairs.get(layer, 0))
        yield drift

        reloads = CounterMetricFamily("ksbpf_policy_reloads", "Policy reloads by result (ok, refused, failed).", labels=["result"])
        for result in ("ok", "refused", "failed"):
            reloads.add_metric([result], st.reloads.get(result, 0))
        yield reloads

        yield GaugeMetricFamily("ksbpf_enforcing", "0 after `down` through the daemon, else 1.", value=1.0 if st.engaged else 0.0)

        yield GaugeMetricFamily(
            "ksbpf_config_last_reload_successful",
            "1 when the last attempt to apply the policy file (start, SIGHUP, ksctl reload) succeeded.",
            value=1.0 if st.config_ok else 0.0,
        )
        yield GaugeMetricFamily(
            "ksbpf_config_last_reload_success_timestamp_seconds",
            "Unix time the policy file was last applied successfully (0: not since the daemon started).",
            value=st.config_applied_at,
        )

        if st.drop_events_lost is not None:
            yield CounterMetricFamily(
                "ksbpf_drop_events_lost",
                "Drop events the kernel could not hand to ksbpfd (ring buffer full); their packets are "
                "still counted, and carried by the next event of their cgroup and reason.",
                value=st.drop_events_lost,
            )

        with self._lock:
            errors = self._errors
        yield CounterMetricFamily("ksbpf_scrape_errors", "Drop counter reads that failed during a scrape.", value=errors)

        info = InfoMetricFamily("ksbpf_build", "ksbpf version and the Python and kernel it runs on.")
        info.add_metric([], {"version": __version__, "python": platform.python_version(), "kernel": platform.release()})
        yield info


# The listener is reachable by every local user, so what one of them can hold is bounded:
# a connection that has sent nothing waits in an epoll set (no thread), at most
# MAX_PENDING of them (the oldest is dropped to make room) and for at most IDLE_TIMEOUT;
# one that sends gets one of MAX_SCRAPES worker threads, or is closed when all are busy;
# a request must arrive and be answered within REQUEST_DEADLINE however slowly its bytes
# trickle in. The daemon's enforcement work (netlink, bpf, nft) therefore keeps about
# 1024 - MAX_PENDING - MAX_SCRAPES descriptors even under the unit's default limit.
MAX_PENDING = 256
MAX_SCRAPES = 4
IDLE_TIMEOUT = 10.0
REQUEST_DEADLINE = 10.0


class MetricsServer:
    """The HTTP endpoint: prometheus_client's WSGI app on a server this class owns, so it
    binds before the daemon reports READY (a bind error is an error at start) and can be
    closed or moved on reload. Bounded against idle and slow clients (see MAX_PENDING)."""

    def __init__(self, collector: KsbpfCollector, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]  # duck-typed, as the docs show
        self._app = make_wsgi_app(self.registry)
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._work: Any = None  # queue.SimpleQueue of (conn, addr) or None to stop
        self._lock = threading.Lock()
        self._idle_workers = 0
        self._active: dict[Any, float] = {}  # connection -> deadline, while a worker serves it
        self._stop_r = self._stop_w = -1

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def bind(self) -> None:
        """Bind now (raises OSError); serve once start() is called."""
        import socket
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        class Quiet(WSGIRequestHandler):
            timeout = REQUEST_DEADLINE  # per read; the whole request is bounded by the loop

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(WSGIServer):
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            # A restarted daemon must get its port back while old connections linger.
            allow_reuse_address = True
            request_queue_size = 64

        self._httpd = make_server(self.host, self.port, self._app, Server, handler_class=Quiet)
        self.port = self._httpd.server_address[1]

    def start(self) -> None:
        import queue

        if self._httpd is None:
            self.bind()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._work = queue.SimpleQueue()
        self._idle_workers = MAX_SCRAPES
        self._workers = [threading.Thread(target=self._worker, name=f"metrics-scrape-{i}", daemon=True)
                         for i in range(MAX_SCRAPES)]
        for w in self._workers:
            w.start()
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import selectors
        import socket

        sock: socket.socket = self._httpd.socket
        sock.setblocking(False)
        sel = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit
        sel.register(sock, selectors.EVENT_READ, "listen")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        pending: dict[socket.socket, tuple[Any, float]] = {}  # insertion order = age

        def drop(conn: socket.socket) -> None:
            pending.pop(conn, None)
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(conn)
            conn.close()

        try:
            while True:
                for key, _ev in sel.select(timeout=1.0):
                    if key.data == "stop":
                        return
                    if key.data == "listen":
                        while True:
                            try:
                                conn, addr = sock.accept()
                            except (BlockingIOError, InterruptedError):
                                break
                            except OSError as e:  # EMFILE and the like: shed the oldest idle one
                                log.warning("metrics: accept failed: %s", e)
                                if pending:
                                    drop(next(iter(pending)))
                                break
                            if len(pending) >= MAX_PENDING:
                                drop(next(iter(pending)))
                            pending[conn] = (addr, time.monotonic())
                            sel.register(conn, selectors.EVENT_READ, "conn")
                        continue
                    conn = key.fileobj  # type: ignore[assignment]
                    addr, _ = pending.pop(conn)
                    sel.unregister(conn)
                    with self._lock:
                        free = self._idle_workers > 0
                        if free:
                            self._idle_workers -= 1
                            self._active[conn] = time.monotonic() + REQUEST_DEADLINE
                    if free:
                        self._work.put((conn, addr))
                    else:
                        conn.close()  # every scrape slot is taken: the client may retry
                now = time.monotonic()
                for conn, (_addr, since) in list(pending.items()):
                    if now - since < IDLE_TIMEOUT:
                        break  # the rest are younger
                    drop(conn)
                with self._lock:
                    late = [c for c, deadline in self._active.items() if now >= deadline]
                for conn in late:  # a trickling client: end its request where it stands
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
        finally:
            for conn in list(pending):
                drop(conn)
            sel.close()

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, addr = item
            try:
                conn.setblocking(True)
                self._httpd.finish_request(conn, addr)
            except Exception as e:  # one broken scrape must not cost a worker
                log.debug("metrics: scrape from %s failed: %s", addr, e)
            finally:
                with self._lock:
                    self._active.pop(conn, None)
                    self._idle_workers += 1
                self._httpd.shutdown_request(conn)

    def close(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:
                os.write(self._stop_w, b"x")
                self._thread.join(timeout=5)
                for _ in self._workers:
                    self._work.put(None)
                with self._lock:
                    serving = list(self._active)
                for conn in serving:
                    with contextlib.suppress(OSError):
                        conn.shutdown(2)
                for w in self._workers:
                    w.join(timeout=5)
                for fd in (self._stop_r, self._stop_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._httpd.server_close()
            self._httpd = None
            self._thread = None
            self._workers = []
