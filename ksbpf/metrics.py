"""Prometheus metrics of the daemon: a custom collector, read at scrape time.

Drop counters come straight from the kernel on every scrape: the named nft counters
(one counter-object dump per table, never a ruleset listing) and the pinned BPF drop map. Everything else
(layers engaged, tunnel links, exemptions, apply durations, drift repairs) is state the
daemon keeps current from events and checks, handed over as a snapshot.

Labels of the drop counters: `layer` (nftables, bpf), `reason` (ksbpf.verdict.Reason),
`family` (ipv4, ipv6; empty for BPF, whose counters are per reason and cgroup only) and
`cgroup` (a path relative to the cgroup2 mount, "/" for the root; empty for nftables,
which cannot tell; "(overflow)" for drops counted after the BPF map filled up).
"""

from __future__ import annotations

import bisect
import logging
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


class CgroupNames:
    """cgroup id -> path for the `cgroup` label. The tree is walked only when an id is not
    known yet, and at most once per `refresh_s`: a cgroup that is gone stays "#<id>"
    until it is seen again."""

    def __init__(self, under: str = "", refresh_s: float = 5.0, mount: Path | None = None) -> None:
        self.under = under
        self.refresh_s = refresh_s
        self.mount = mount
        self._names: dict[int, str] = {}
        self._walked = float("-inf")
        self._lock = threading.Lock()

    def set_root(self, under: str) -> None:
        with self._lock:
            if under != self.under:
                self.under = under
                self._walked = float("-inf")

    def name(self, cgroup_id: int) -> str:
        if cgroup_id == 0:
            return OVERFLOW_CGROUP
        with self._lock:
            if cgroup_id not in self._names and time.monotonic() - self._walked >= self.refresh_s:
                self._walk()
            return self._names.get(cgroup_id, f"#{cgroup_id}")

    def _walk(self) -> None:
        from ksbpf.errors import KsbpfError
        from ksbpf.linux.cgroup import ids_by_path

        self._walked = time.monotonic()
        try:
            found = ids_by_path(self.mount, self.under)
        except (KsbpfError, OSError) as e:
            log.warning("cannot resolve cgroup ids for metrics: %s", e)
            return
        # Keep names of cgroups that went away: their counters still carry the old id.
        self._names.update({i: (p or "/") for p, i in found.items()})


def nft_drop_samples(nft: Any) -> list[DropSample]:
    """From NftLayer.drops(): (reason, family, packets, bytes) per named counter."""
    return [
        DropSample("nftables", str(getattr(reason, "value", reason)), FAMILY_LABEL.get(fam, str(fam)), "", int(p), int(b))
        for reason, fam, p, b in nft.drops()
    ]


def bpf_drop_samples(bpf: Any, names: CgroupNames) -> list[DropSample]:
    """From BpfLayer.counters(): (reason, cgroup id, packets, bytes) from the pinned map."""
    return [DropSample("bpf", str(reason), "", names.name(int(cg)), int(p), int(b)) for reason, cg, p, b in bpf.counters()]


def merge_samples(samples: Iterable[DropSample]) -> list[DropSample]:
    """Several cgroup ids may resolve to one label (a cgroup recreated under its path):
    one series per label set."""
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

        with self._lock:
            errors = self._errors
        yield CounterMetricFamily("ksbpf_scrape_errors", "Drop counter reads that failed during a scrape.", value=errors)

        info = InfoMetricFamily("ksbpf_build", "ksbpf version and the Python and kernel it runs on.")
        info.add_metric([], {"version": __version__, "python": platform.python_version(), "kernel": platform.release()})
        yield info


class MetricsServer:
    """The HTTP endpoint: prometheus_client's WSGI app on a server this class owns, so it
    binds before the daemon reports READY (a bind error is an error at start) and can be
    closed or moved on reload."""

    def __init__(self, collector: KsbpfCollector, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]  # duck-typed, as the docs show
        self._app = make_wsgi_app(self.registry)
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def bind(self) -> None:
        """Bind now (raises OSError); serve once start() is called."""
        import socket
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            # A restarted daemon must get its port back while old connections linger.
            allow_reuse_address = True

        self._httpd = make_server(self.host, self.port, self._app, Server, handler_class=Quiet)
        self.port = self._httpd.server_address[1]

    def start(self) -> None:
        if self._httpd is None:
            self.bind()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(timeout=5)
            self._httpd.server_close()
            self._httpd = None
            self._thread = None
