"""The daemon's Prometheus collector, exposed and parsed as Prometheus would."""

from __future__ import annotations

import os
import platform
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ksbpf import __version__
from ksbpf.metrics import (
    CgroupNames,
    DropSample,
    Histogram,
    KsbpfCollector,
    MetricsServer,
    Snapshot,
    bpf_drop_samples,
    merge_samples,
    nft_drop_samples,
)
from ksbpf.verdict import Reason

Parsed = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Parsed, dict[str, str]]:
    samples: Parsed = {}
    types = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def expose(collector: KsbpfCollector) -> tuple[Parsed, dict[str, str]]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)  # type: ignore[arg-type]
    return parse(generate_latest(reg).decode())


class FakeNft:
    def __init__(self, rows: list[tuple[Reason, int, int, int]]) -> None:
        self.rows = rows

    def drops(self) -> list[tuple[Reason, int, int, int]]:
        return self.rows


class FakeBpf:
    def __init__(self, rows: list[tuple[str, int, int, int]]) -> None:
        self.rows = rows

    def counters(self) -> list[tuple[str, int, int, int]]:
        return self.rows


def test_every_metric_with_its_labels_and_types(tmp_path: Path) -> None:
    svc = tmp_path / "system.slice" / "sshd.service"
    svc.mkdir(parents=True)
    names = CgroupNames(mount=tmp_path)
    nft = FakeNft([(Reason.NO_TUNNEL, 4, 7, 420), (Reason.DNS, 6, 2, 160)])
    bpf = FakeBpf([("no_tunnel", svc.stat().st_ino, 3, 180), ("dns", 0, 1, 60)])
    hist = Histogram()
    hist.observe(0.004)
    hist.observe(0.7)
    snap = Snapshot(layers={"nftables": True, "routing": True, "bpf": False}, tunnels={"wg0": True, "tun*": False},
                    exemptions=2, drift_repairs={"nftables": 1}, reloads={"refused": 3})
    col = KsbpfCollector(lambda: snap, [lambda: nft_drop_samples(nft), lambda: bpf_drop_samples(bpf, names)], hist)
    m, types = expose(col)

    def get(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert types["ksbpf_dropped_packets"] == "counter" and types["ksbpf_drift_repairs"] == "counter"
    assert get("ksbpf_dropped_packets_total", layer="nftables", reason="no_tunnel", family="ipv4", cgroup="") == 7
    assert get("ksbpf_dropped_bytes_total", layer="nftables", reason="dns", family="ipv6", cgroup="") == 160
    assert get("ksbpf_dropped_packets_total", layer="bpf", reason="no_tunnel", family="", cgroup="system.slice/sshd.service") == 3
    assert get("ksbpf_dropped_bytes_total", layer="bpf", reason="dns", family="", cgroup="(overflow)") == 60
    assert [get("ksbpf_layer_engaged", layer=n) for n in ("nftables", "routing", "bpf")] == [1, 1, 0]
    assert get("ksbpf_tunnel_up", interface="wg0") == 1 and get("ksbpf_tunnel_up", interface="tun*") == 0
    assert get("ksbpf_exemptions") == 2
    assert get("ksbpf_drift_repairs_total", layer="nftables") == 1 and get("ksbpf_drift_repairs_total", layer="bpf") == 0
    assert get("ksbpf_policy_reloads_total", result="refused") == 3 and get("ksbpf_policy_reloads_total", result="ok") == 0
    assert types["ksbpf_policy_apply_seconds"] == "histogram"
    assert get("ksbpf_policy_apply_seconds_bucket", le="0.005") == 1
    assert get("ksbpf_policy_apply_seconds_bucket", le="0.5") == 1
    assert get("ksbpf_policy_apply_seconds_bucket", le="1.0") == 2
    assert get("ksbpf_policy_apply_seconds_bucket", le="+Inf") == 2
    assert get("ksbpf_policy_apply_seconds_count") == 2
    assert get("ksbpf_policy_apply_seconds_sum") == pytest.approx(0.704)
    assert get("ksbpf_build_info", version=__version__, python=platform.python_version(), kernel=os.uname().release) == 1
    assert get("ksbpf_scrape_errors_total") == 0


def test_a_failing_reader_loses_only_its_series() -> None:
    def broken() -> list[DropSample]:
        raise OSError("bpffs gone")

    nft = FakeNft([(Reason.FORWARD, 4, 5, 500)])
    col = KsbpfCollector(Snapshot, [broken, lambda: nft_drop_samples(nft)], Histogram())
    m, _ = expose(col)
    assert m[("ksbpf_dropped_packets_total", (("cgroup", ""), ("family", "ipv4"), ("layer", "nftables"), ("reason", "forward")))] == 5
    assert m[("ksbpf_scrape_errors_total", ())] == 1
    assert not any(k[0] == "ksbpf_dropped_packets_total" and ("layer", "bpf") in k[1] for k in m)


def test_cgroup_ids_resolve_to_paths_lazily(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    names = CgroupNames(mount=tmp_path, refresh_s=3600)
    assert names.name(tmp_path.stat().st_ino) == "/"
    assert names.name(a.stat().st_ino) == "a"
    b = tmp_path / "a" / "b"
    b.mkdir()
    # Walked less than refresh_s ago: an unknown id waits for the next walk.
    assert names.name(b.stat().st_ino) == f"#{b.stat().st_ino}"
    names.refresh_s = 0
    assert names.name(b.stat().st_ino) == "a/b"
    old = b.stat().st_ino
    b.rmdir()
    assert names.name(old) == "a/b", "a cgroup that went away keeps its name"
    assert names.name(0) == "(overflow)"


def test_samples_with_the_same_labels_are_summed() -> None:
    merged = merge_samples([
        DropSample("bpf", "dns", "", "svc", 1, 10), DropSample("bpf", "dns", "", "svc", 2, 20),
        DropSample("bpf", "dns", "", "other", 4, 40),
    ])
    assert merged == [DropSample("bpf", "dns", "", "other", 4, 40), DropSample("bpf", "dns", "", "svc", 3, 30)]


def test_histogram_is_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    buckets, total = h.snapshot()
    assert buckets == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert total == pytest.approx(2.65)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_server_binds_before_it_serves_and_closes(host: str) -> None:
    nft = FakeNft([(Reason.NO_TUNNEL, 4, 1, 60)])
    col = KsbpfCollector(Snapshot, [lambda: nft_drop_samples(nft)], Histogram())
    server = MetricsServer(col, host, 0)
    try:
        server.bind()
    except OSError as e:
        pytest.skip(f"cannot bind {host}: {e}")
    try:
        assert server.port > 0
        server.start()
        url = f"http://{'[' + host + ']' if ':' in host else host}:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            m, _ = parse(r.read().decode())
        assert m[("ksbpf_dropped_packets_total", (("cgroup", ""), ("family", "ipv4"), ("layer", "nftables"), ("reason", "no_tunnel")))] == 1
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_port_in_use_is_an_error_at_bind() -> None:
    col = KsbpfCollector(Snapshot, [], Histogram())
    first = MetricsServer(col, "127.0.0.1", 0)
    first.bind()
    try:
        with pytest.raises(OSError):
            MetricsServer(col, "127.0.0.1", first.port).bind()
    finally:
        first.close()


# ------------------------------------------------------------------ a bounded listener


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_connections_cannot_starve_the_listener_or_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of connections that never send a byte (any local user can open them) take
    no scrape slot and at most MAX_PENDING descriptors of the daemon; a scrape still answers."""
    import socket
    import time

    from ksbpf import metrics

    monkeypatch.setattr(metrics, "MAX_PENDING", 32)
    col = KsbpfCollector(Snapshot, [lambda: nft_drop_samples(FakeNft([(Reason.NO_TUNNEL, 4, 1, 60)]))], Histogram())
    server = MetricsServer(col, "127.0.0.1", 0)
    server.start()
    idle: list[socket.socket] = []
    try:
        before = _open_fds()
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.5)  # let the server accept what it will
        # Our 300 client ends are ours; the server's ends are bounded by MAX_PENDING.
        held_by_server = _open_fds() - before - len(idle)
        assert held_by_server <= 32 + metrics.MAX_SCRAPES, held_by_server
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            m, _ = parse(r.read().decode())
        assert m[("ksbpf_dropped_packets_total", (("cgroup", ""), ("family", "ipv4"), ("layer", "nftables"), ("reason", "no_tunnel")))] == 1
        # The oldest idle connections were shed to make room: the server closed them.
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()
        server.close()


def test_a_trickling_client_is_cut_at_the_request_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from ksbpf import metrics

    monkeypatch.setattr(metrics, "REQUEST_DEADLINE", 1.5)
    monkeypatch.setattr(metrics, "MAX_SCRAPES", 1)  # one slot: the slow client holds it
    server = MetricsServer(KsbpfCollector(Snapshot, [], Histogram()), "127.0.0.1", 0)
    server.start()
    try:
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        t0 = time.monotonic()
        closed = False
        for ch in b"GET /metrics HTTP/1.0\r\n":  # a byte every 0.3 s: each read is quick
            try:
                slow.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            slow.settimeout(0.3)
            try:
                if slow.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        took = time.monotonic() - t0
        assert closed, "the slow client was never cut off"
        assert took < 6.9, took  # the whole line would take 7 s at this pace
        # Its slot is free again: a normal scrape answers.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert b"ksbpf_build_info" in r.read()
        slow.close()
    finally:
        server.close()
