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
    slice_label,
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
    assert types["ksbpf_config_last_reload_successful"] == "gauge"
    assert get("ksbpf_config_last_reload_successful") == 1
    assert get("ksbpf_config_last_reload_success_timestamp_seconds") == 0


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
    names = CgroupNames(mount=tmp_path, refresh_s=3600, mode="cgroup")
    assert names.name(tmp_path.stat().st_ino) == "/"
    assert names.name(a.stat().st_ino) == "a"
    b = tmp_path / "a" / "b"
    b.mkdir()
    # Walked less than refresh_s ago: an unknown id waits for the next walk, left out meanwhile
    # (not "(gone)": that series would then go down when the id gets its name).
    assert names.name(b.stat().st_ino) is None
    names.refresh_s = 0
    assert names.name(b.stat().st_ino) == "a/b"
    old = b.stat().st_ino
    b.rmdir()
    assert names.name(old) == "(gone)", "a removed cgroup folds once a walk misses it"
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


# ------------------------------------------------------------------ bounded cgroup labels


@pytest.mark.parametrize(("path", "label"), [
    ("", "/"),
    ("/", "/"),
    ("system.slice/sshd.service", "system.slice/sshd.service"),
    ("system.slice/sshd.service/child", "system.slice/sshd.service"),
    ("system.slice/system-getty.slice/getty@tty1.service", "system.slice/system-getty.slice"),
    ("system.slice/docker-0123abcd.scope", "system.slice"),
    ("system.slice/run-u123.service", "system.slice"),  # systemd-run: one unit per command
    ("system.slice/sshd@3-10.0.0.1:22-10.0.0.2:5555.service", "system.slice"),  # per connection
    ("system.slice/var-lib-docker.mount", "system.slice"),
    ("user.slice/user-1000.slice/session-3.scope", "user.slice"),
    ("user.slice/user-1000.slice/user@1000.service/app.slice/firefox.scope", "user.slice"),
    ("machine.slice/machine-vm1.scope", "machine.slice"),
    ("init.scope", "init.scope"),
    ("ksbpf-test/bpf/app", "ksbpf-test"),
])
def test_slice_label_cuts_to_the_slice_or_named_service(path: str, label: str) -> None:
    assert slice_label(path) == label


class Tree:
    """A directory tree standing in for the cgroup2 mount: ids are inode numbers, as there."""

    def __init__(self, root: Path, paths: list[str]) -> None:
        self.root = root
        self.ids: dict[str, int] = {}
        for p in paths:
            (root / p).mkdir(parents=True, exist_ok=True)
            self.ids[p] = (root / p).stat().st_ino

    def remove(self, path: str) -> None:
        (self.root / path).rmdir()


def bpf_series(names: CgroupNames, rows: list[tuple[str, int, int, int]]) -> dict[tuple[str, str], int]:
    return {(s.reason, s.cgroup): s.packets for s in merge_samples(bpf_drop_samples(FakeBpf(rows), names))}


SCOPES = ["system.slice/sshd.service", "system.slice/docker-1.scope",
          "user.slice/user-1000.slice/session-3.scope", "user.slice/user-1000.slice/session-4.scope"]


def test_slice_mode_folds_scopes_into_their_slice_and_keeps_it_when_they_go(tmp_path: Path) -> None:
    t = Tree(tmp_path, SCOPES)
    names = CgroupNames(mount=tmp_path, refresh_s=0)  # the default mode
    assert names.mode == "slice"
    rows = [("dns", t.ids[p], n, n * 100) for p, n in zip(SCOPES, (1, 2, 4, 8), strict=True)] + [("dns", 0, 16, 1600)]
    before = bpf_series(names, rows)
    assert before == {("dns", "system.slice/sshd.service"): 1, ("dns", "system.slice"): 2,
                      ("dns", "user.slice"): 12, ("dns", "(overflow)"): 16}
    # A session ends (its counters stay in the map under its id): the same series, no step.
    t.remove("user.slice/user-1000.slice/session-3.scope")
    t.remove("system.slice/docker-1.scope")
    assert bpf_series(names, rows) == before


def test_cgroup_mode_names_whole_paths_and_folds_removed_ones_into_gone(tmp_path: Path) -> None:
    t = Tree(tmp_path, SCOPES)
    names = CgroupNames(mount=tmp_path, refresh_s=0, mode="cgroup")
    rows = [("no_tunnel", t.ids[p], n, 0) for p, n in zip(SCOPES, (1, 2, 4, 8), strict=True)]
    assert bpf_series(names, rows) == {("no_tunnel", p): n for p, n in zip(SCOPES, (1, 2, 4, 8), strict=True)}
    t.remove("user.slice/user-1000.slice/session-3.scope")
    t.remove("system.slice/docker-1.scope")
    assert bpf_series(names, rows) == {("no_tunnel", "system.slice/sshd.service"): 1,
                                       ("no_tunnel", "user.slice/user-1000.slice/session-4.scope"): 8,
                                       ("no_tunnel", "(gone)"): 6}


def test_none_mode_has_one_series_per_reason(tmp_path: Path) -> None:
    t = Tree(tmp_path, SCOPES)
    names = CgroupNames(mount=tmp_path, refresh_s=0, mode="none")
    rows = [("dns", t.ids[p], 1, 10) for p in SCOPES] + [("dns", 0, 1, 10), ("ipv6", t.ids[SCOPES[0]], 3, 30)]
    assert bpf_series(names, rows) == {("dns", ""): 5, ("ipv6", ""): 3}


def test_thousands_of_short_lived_scopes_stay_a_few_series_and_no_id_series(tmp_path: Path) -> None:
    """A host that makes a scope per session or job: some are walked while they exist,
    others come and go between two scrapes (never named: only their ids remain in the
    counters). Neither becomes a "#<id>" series, and the names held stay bounded by what
    the counters hold."""
    t = Tree(tmp_path, ["system.slice/sshd.service"])
    for mode, expected in (("slice", {"user.slice", "system.slice", "system.slice/sshd.service", "(gone)"}),
                           ("cgroup", {"(gone)", "system.slice/sshd.service"})):
        names = CgroupNames(mount=tmp_path, refresh_s=0, mode=mode)
        walked = [f"{mode}-{i}" for i in range(1000)]
        walked = [f"user.slice/user-1000.slice/session-{n}.scope" for n in walked[::2]] + \
                 [f"system.slice/docker-{n}.scope" for n in walked[1::2]]
        rows: list[tuple[str, int, int, int]] = [("dns", t.ids["system.slice/sshd.service"], 1, 1)]
        seen = Tree(tmp_path, walked)
        rows += [("dns", seen.ids[p], 1, 1) for p in walked]
        bpf_series(names, rows)
        # Made after that scrape and all removed before the next (no inode is reused meanwhile).
        between = [f"user.slice/user-1000.slice/session-{mode}-x{i}.scope" for i in range(1000)]
        unseen = Tree(tmp_path, between)
        rows += [("dns", unseen.ids[p], 1, 1) for p in between]
        for p in walked + between:
            (tmp_path / p).rmdir()
        series = bpf_series(names, rows)
        assert {cg for _, cg in series} == expected, mode
        assert series[("dns", "(gone)")] >= 1000
        assert sum(series.values()) == len(rows), "every drop is still counted"
        # The map is reset (a re-engage): nothing of the gone cgroups is held any more.
        assert bpf_series(names, rows[:1]) == {("dns", "system.slice/sshd.service"): 1}
        assert not names._unknown_since and len(names._paths) <= 6, len(names._paths)


def test_gone_never_goes_down_while_cgroups_come_and_go(tmp_path: Path) -> None:
    """Counters are monotonic per series whatever the timing of walks: an id first met
    between walks is left out until a walk names it (or finds it gone), never counted as
    "(gone)" and then moved away."""
    t = Tree(tmp_path, [f"ksbpf-test/c{i}" for i in range(40)])
    names = CgroupNames(mount=tmp_path, refresh_s=3600, mode="cgroup")
    rows: list[tuple[str, int, int, int]] = []
    last: dict[tuple[str, str], int] = {}
    for i in range(40):
        rows = [(r, cg, p + 1, b) for r, cg, p, b in rows] + [("dns", t.ids[f"ksbpf-test/c{i}"], 1, 1)]
        if i % 3 == 0:
            t.remove(f"ksbpf-test/c{i}")
        names.refresh_s = 0 if i % 5 == 0 else 3600  # a walk only now and then
        series = bpf_series(names, rows)
        for key, value in last.items():
            if key in series:
                assert series[key] >= value, (i, key)
        assert series.get(("dns", "(gone)"), 0) >= last.get(("dns", "(gone)"), 0)
        last = series


def test_reload_gauges_come_from_the_snapshot() -> None:
    snap = Snapshot(config_ok=False, config_applied_at=1764860000.5)
    m, types = expose(KsbpfCollector(lambda: snap, [], Histogram()))
    assert types["ksbpf_config_last_reload_success_timestamp_seconds"] == "gauge"
    assert m[("ksbpf_config_last_reload_successful", ())] == 0
    assert m[("ksbpf_config_last_reload_success_timestamp_seconds", ())] == 1764860000.5


def test_policy_cgroup_label_default_values_and_refusals() -> None:
    from ksbpf.errors import PolicyError
    from ksbpf.policy import PolicyParser, loads_policy

    base = '[tunnel]\ninterfaces = ["wg0"]\n'
    assert loads_policy(base).metrics.cgroup_label == "slice"
    for mode in ("cgroup", "slice", "none"):
        text = base + f'[metrics]\ncgroup_label = "{mode}"\n'
        assert loads_policy(text).metrics.cgroup_label == mode
        assert PolicyParser().loads(text) == loads_policy(text)
    for bad, why in (('"path"', "'cgroup', 'slice' or 'none'"), ("true", "")):
        with pytest.raises(PolicyError) as e:
            loads_policy(base + f"[metrics]\ncgroup_label = {bad}\n")
        assert "metrics.cgroup_label" in str(e.value) and why in str(e.value)
    names = CgroupNames()
    with pytest.raises(ValueError, match="cgroup label mode"):
        names.set_mode("path")
