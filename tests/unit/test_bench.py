"""The bench's pure parts: parsers, medians and ratios, policies, report rendering."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import policies, report, stats
from bench.control import parse_importtime, parse_up_ms
from bench.run import plan
from bench.workloads import WorkloadError, last_json, parse_iperf3
from ksbpf.policy import loads_policy

# ------------------------------------------------------------------ parsers


def test_parse_iperf3_reads_received_rate_retransmits_and_cpu() -> None:
    text = json.dumps({"end": {"sum_received": {"bits_per_second": 12.5e9},
                               "sum_sent": {"bits_per_second": 12.6e9, "retransmits": 7},
                               "cpu_utilization_percent": {"host_total": 50.0}}})
    out = parse_iperf3(text)
    assert out["tcp_gbps"] == pytest.approx(12.5)
    assert out["tcp_retransmits"] == 7
    assert out["tcp_gbps_per_cpu"] == pytest.approx(25.0)


@pytest.mark.parametrize("text", ['{"error": "unable to connect"}', "not json", '{"end": {}}'])
def test_parse_iperf3_refuses_failures(text: str) -> None:
    with pytest.raises(WorkloadError):
        parse_iperf3(text)


def test_last_json_takes_the_last_object_line() -> None:
    assert last_json('{"ready": true}\nnoise\n{"pps": 5.0}\n') == {"pps": 5.0}
    with pytest.raises(WorkloadError):
        last_json("nothing here\n")


def test_parse_up_ms() -> None:
    assert parse_up_ms("ksbpf up (/tmp/p.toml) in 123 ms [netns x]\n  nftables engaged") == pytest.approx(0.123)
    assert parse_up_ms("ksbpf down") is None


def test_parse_importtime_sorts_by_cumulative_and_keeps_depth() -> None:
    text = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |   tomllib._re",
        "import time:       200 |        300 | tomllib",
        "import time:      1500 |       2000 | ksbpf.cli",
    ])
    rows = parse_importtime(text, top=2)
    assert [r["module"] for r in rows] == ["ksbpf.cli", "tomllib"]
    assert rows[0]["cumulative_ms"] == pytest.approx(2.0)
    assert parse_importtime(text)[-1]["depth"] == 1


# ------------------------------------------------------------------ stats


def test_median_and_quantile() -> None:
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([4, 1, 2, 3]) == 2.5
    assert math.isnan(stats.median([]))
    assert stats.quantile([1, 2, 3, 4, 5], 0.25) == 2
    assert stats.quantile([1, 2], 0.5) == 1.5


def _s(seq: int, config: str, n: int, **metrics: float) -> dict[str, object]:
    return {"round": 0, "seq": seq, "config": config, "n": n, "metrics": metrics}


def test_ratio_uses_the_bracketing_baselines() -> None:
    samples = [_s(0, "none", 0, udp_tx_pps=100.0), _s(1, "ksbpf", 1, udp_tx_pps=90.0),
               _s(2, "none", 0, udp_tx_pps=80.0), _s(3, "nft", 1, udp_tx_pps=72.0)]
    r = stats.with_ratios(samples)
    assert r[1]["ratios"]["udp_tx_pps"] == pytest.approx(1.0)  # 90 / mean(100, 80)
    assert r[3]["ratios"]["udp_tx_pps"] == pytest.approx(0.9)  # only a baseline before it
    assert r[0]["ratios"]["udp_tx_pps"] == 1.0


def test_summarize_takes_medians_and_skips_errors() -> None:
    samples = [_s(0, "none", 0, udp_tx_pps=100.0)]
    for i, v in enumerate([90.0, 95.0, 70.0]):
        samples += [_s(2 * i + 1, "ksbpf", 1, udp_tx_pps=v), _s(2 * i + 2, "none", 0, udp_tx_pps=100.0)]
    samples.append({"round": 0, "seq": 99, "config": "bpf", "n": 10000, "metrics": {}, "error": "E2BIG"})
    rows = {(r["config"], r["n"]): r for r in stats.summarize(samples)}
    assert rows[("ksbpf", 1)]["median"]["udp_tx_pps"] == 90.0
    assert rows[("ksbpf", 1)]["ratio"]["udp_tx_pps"] == pytest.approx(0.9)
    assert rows[("ksbpf", 1)]["samples"] == 3
    assert ("bpf", 10000) not in rows
    assert stats.errors(samples) == {("bpf", 10000): "E2BIG"}


def test_flatness_is_relative_to_the_smallest_n() -> None:
    rows = [{"config": "ksbpf", "n": 1, "ratio": {"m": 0.9}}, {"config": "ksbpf", "n": 100, "ratio": {"m": 0.9}},
            {"config": "ksbpf", "n": 10000, "ratio": {"m": 0.45}}, {"config": "nft", "n": 1, "ratio": {"m": 1.0}}]
    assert stats.flatness(rows, "ksbpf", "m") == {1: 1.0, 100: 1.0, 10000: 0.5}
    assert stats.flatness(rows, "mullvad", "m") == {}


def test_summarize_control_medians_per_op_and_n() -> None:
    samples = [{"op": "exempt", "n": 1, "round": r, "wall_s": v} for r, v in enumerate([0.3, 0.1, 0.2])]
    samples.append({"op": "exempt", "n": 1, "round": 3, "wall_s": 9.0, "error": "boom"})
    (row,) = stats.summarize_control(samples)
    assert row["median"] == {"wall_s": 0.2}
    assert row["samples"] == 3


# ------------------------------------------------------------------ policies and the plan


def test_policy_text_has_n_endpoints_and_exemptions_and_validates() -> None:
    text = policies.policy_text("kbtun0", "10.201.0.2", "ksbpf-bench-x", 3, kernel_source="/k", extra_endpoints=1)
    p = loads_policy(text, "<test>")
    assert len(p.tunnel.endpoints) == 4
    assert [e.cgroup for e in p.exemptions] == [f"ksbpf-bench-x/ex/{i}" for i in range(3)]
    assert len({e.to for e in p.exemptions}) == 3
    assert p.tunnel.endpoint_mark == policies.ENDPOINT_MARK
    assert p.bpf.cgroup == "ksbpf-bench-x" and p.bpf.kernel_source == "/k"


def test_mullvad_baseline_grows_one_rule_per_endpoint_and_direction() -> None:
    text = policies.baseline_text("mullvad", 5)
    assert text.count("add rule inet ksbench_mullvad relays_out") == 5
    assert text.count("add rule inet ksbench_mullvad relays_in") == 5
    assert "policy drop" in text and "ct state established,related accept" in text
    assert policies.baseline_text("wgquick", 5) == policies.baseline_path("wgquick").read_text()
    assert "fib daddr type != local reject" in policies.baseline_text("wgquick", 1)


def test_plan_interleaves_no_filtering_between_every_configuration() -> None:
    p = plan(["none", "ksbpf", "nft", "wgquick"], [1, 100], rnd=0, seed=1)
    assert p[0] == ("none", 0) and p[-1] == ("none", 0)
    measured = p[1::2]
    assert all(c != "none" for c, _ in measured) and all(c == "none" for c, _ in p[::2])
    assert sorted(measured) == sorted([("ksbpf", 1), ("nft", 1), ("wgquick", 1), ("ksbpf", 100), ("nft", 100)])
    assert plan(["none", "ksbpf", "nft"], [1], 0, 1) == plan(["none", "ksbpf", "nft"], [1], 0, 1)


# ------------------------------------------------------------------ report


def test_replace_between_markers_touches_only_the_block() -> None:
    text = f"# T\nbefore\n{report.BEGIN}\nold table\n{report.END}\nafter\n"
    new = report.replace_between_markers(text, "| new |\n")
    assert new == f"# T\nbefore\n{report.BEGIN}\n| new |\n{report.END}\nafter\n"
    assert report.replace_between_markers("no markers", "x") is None
    assert report.replace_between_markers(f"{report.END}\n{report.BEGIN}", "x") is None


def test_update_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.BEGIN}\n{report.END}\nb\n")
    assert report.update_readme(readme, "T")
    assert readme.read_text() == f"a\n{report.BEGIN}\nT\n{report.END}\nb\n"
    assert not report.update_readme(tmp_path / "missing.md", "T")


def _results() -> dict[str, object]:
    samples = []
    seq = 0

    def add(config: str, n: int, pps: float, cpu: float, tcp: float) -> None:
        nonlocal seq
        samples.append(_s(seq, config, n, udp_tx_pps=pps, udp_pps_per_cpu=cpu, tcp_gbps=tcp,
                          rr_p50_us=50.0, rr_p99_us=90.0))
        seq += 1

    add("none", 0, 1000.0, 1000.0, 10.0)
    for config, n, pps in (("ksbpf", 1, 950.0), ("ksbpf", 10000, 940.0), ("mullvad", 1, 750.0),
                           ("mullvad", 10000, 100.0), ("nft", 1, 970.0), ("nft", 10000, 965.0),
                           ("bpf", 1, 980.0), ("wgquick", 1, 990.0)):
        add(config, n, pps, pps, 9.9)
        add("none", 0, 1000.0, 1000.0, 10.0)
    samples.append({"round": 0, "seq": 99, "config": "bpf", "n": 10000, "metrics": {}, "error": "E2BIG ks_endpoints"})
    control = [{"op": "up_warm", "n": n, "round": 0, "wall_s": 0.25} for n in (1, 10000)]
    control += [{"op": "exempt", "n": n, "round": 0, "wall_s": 0.04} for n in (1, 10000)]
    control += [{"op": "reload", "n": 10000, "round": 0, "wall_s": 0.9},
                {"op": "daemon_rss", "n": 1, "round": 0, "rss_kb": 46080, "peak_rss_kb": 50000},
                {"op": "reload_rpc", "n": 10000, "round": 0, "wall_s": 0.15},
                {"op": "daemon_start", "n": 10000, "round": 0, "error": "ksbpfd did not answer"}]
    return {"date": "2026-01-01T00:00:00+00:00", "kernel": "6.18.0", "machine": {"cpu": "X", "cpus": 2},
            "params": {"n": [1, 10000], "rounds": 1, "seconds": 2.0}, "dataplane": samples, "control": control}


def test_targets() -> None:
    t = {row["target"]: row for row in report.targets(_results())}
    udp = next(v for k, v in t.items() if k.startswith("UDP 64 B pps"))
    assert udp["measured"] == pytest.approx(0.95) and udp["met"] is True
    flat = next(v for k, v in t.items() if "within 3%" in k)
    assert flat["measured"] == pytest.approx(940 / 950) and flat["met"] is True
    mull = next(v for k, v in t.items() if k.startswith("UDP pps: better"))
    assert mull["measured"] == pytest.approx(950 / 750) and mull["met"] is True
    reload_ = next(v for k, v in t.items() if k.startswith("reload"))
    assert reload_["met"] is False
    assert all(v["met"] for k, v in t.items() if "exempt" in k or "warm" in k)


def test_render_markdown_has_every_table_and_names_refusals() -> None:
    md = report.render_markdown(_results(), Path("bench/results/2026-01-01-6.18.0.json"))
    assert "| ksbpf, all layers | 9.90 (0.990) | 1 (0.950) |" in md
    assert "| Mullvad-style ruleset | 0.750 (0.750) | 0.100 (0.100) | 0.133 (0.133) |" in md
    assert "| ksbpf cgroup-bpf alone | 0.980 (0.980) | refused |" in md
    assert "E2BIG ks_endpoints" in md
    assert "| reload (`up` with one endpoint more) | – | 900 |" in md
    assert "| ksbpfd RSS at rest, MiB | 45.0 | – |" in md
    assert "ksbpfd: `ksbpfd did not answer`" in md
    assert "| reload of a 10,000+10,000-entry policy through ksbpfd ≤ 200 ms | 150 ms | yes |" in md
    assert "`bench/results/2026-01-01-6.18.0.json`" in md
    assert "| **no** |" in md


def test_results_path() -> None:
    import datetime as dt

    when = dt.datetime(2026, 3, 4, tzinfo=dt.UTC)
    assert report.results_path(Path("r"), when, "6.18.0") == Path("r/2026-03-04-6.18.0.json")
    assert report.results_path(Path("r"), when, "6.18.0", quick=True).name == "2026-03-04-6.18.0-quick.json"
    assert report.results_path(Path("r"), when, "6.18.0", tag="tcp").name == "2026-03-04-6.18.0-tcp.json"


# ------------------------------------------------------------------ profiles


def test_perf_report_parsing_and_classification() -> None:
    from bench import profile

    text = "\n".join([
        "# Samples: 14K of event 'cpu-clock'",
        "     2.26%  [k] bpf_prog_bcb2f37845693455_ks_egress        -      -",
        "     2.08%  [k] nft_do_chain                               -      -",
        "     0.71%  [k] htab_map_hash                              -      -",
        "     0.50%  [k] nf_conntrack_in                            -      -",
        "     0.11%  [k] nf_hook_slow                               -      -",
        "     0.30%  [k] fib_rules_lookup                           -      -",
        "    14.86%  [k] _raw_spin_unlock_irqrestore                -      -",
        "     1.00%  [.] __sendmmsg                                 -      -",
    ])
    symbols = profile.parse_report(text)
    assert symbols["nft_do_chain"] == 2.08 and "__sendmmsg" not in symbols
    parts = profile.classify(symbols)
    assert parts["nftables"] == pytest.approx(2.19)
    assert parts["conntrack"] == pytest.approx(0.5)
    assert parts["cgroup-bpf"] == pytest.approx(2.97)
    assert parts["policy routing"] == pytest.approx(0.3)
    assert profile.top_symbols(symbols, "nftables")[0] == ("nft_do_chain", 2.08)
    assert ("nf_conntrack_in", 0.5) not in profile.top_symbols(symbols, "nftables")


def test_summarize_profile_subtracts_what_no_filtering_shows() -> None:
    samples = [
        {"config": "none", "n": 0, "ns_per_packet": 1000.0, "ns": {"nftables": 0.0, "cgroup-bpf": 20.0}},
        {"config": "none", "n": 0, "ns_per_packet": 1010.0, "ns": {"nftables": 0.0, "cgroup-bpf": 30.0}},
        {"config": "ksbpf", "n": 1, "ns_per_packet": 1100.0, "ns": {"nftables": 40.0, "cgroup-bpf": 75.0}},
        {"config": "ksbpf", "n": 1, "error": "x"},
    ]
    rows = {r["config"]: r for r in stats.summarize_profile(samples)}
    assert rows["none"]["ns"]["cgroup-bpf"] == 25.0 and rows["none"]["attributed_ns"] == 0.0
    assert rows["ksbpf"]["attributed_ns"] == pytest.approx(40.0 + 50.0)
    assert rows["ksbpf"]["samples"] == 1


def test_minimal_program_is_one_lookup_then_pass() -> None:
    from bench.minimal import one_lookup_program

    code = one_lookup_program(7)
    assert len(code) == 8 * 8
    assert code[3 * 8] == 0x18 and int.from_bytes(code[3 * 8 + 4: 3 * 8 + 8], "little") == 7
    assert code[-8] == 0x95


# ------------------------------------------------------------------ drop flood

METRICS_BEFORE = """\
# HELP ksbpf_dropped_packets_total Packets dropped.
# TYPE ksbpf_dropped_packets_total counter
ksbpf_dropped_packets_total{layer="nftables",reason="dns",family="ipv4",cgroup=""} 10.0
ksbpf_dropped_packets_total{layer="bpf",reason="dns",family="ipv4",cgroup="a"} 2.0
ksbpf_dropped_packets_total{layer="bpf",reason="dns",family="ipv4",cgroup="b"} 3.0
# HELP ksbpf_drop_events_lost_total Events lost.
# TYPE ksbpf_drop_events_lost_total counter
ksbpf_drop_events_lost_total 1.0
"""


def test_parse_drop_metrics_sums_over_other_labels() -> None:
    from bench.dropflood import parse_drop_metrics

    m = parse_drop_metrics(METRICS_BEFORE)
    assert m["dropped"] == {"nftables/dns": 10.0, "bpf/dns": 5.0}
    assert m["dropped_total"] == 15.0 and m["lost"] == 1.0
    assert parse_drop_metrics("# nothing\n") == {"dropped": {}, "dropped_total": 0, "lost": None}


def test_cpu_ticks_reads_utime_and_stime_past_an_odd_command_name() -> None:
    from bench.dropflood import cpu_ticks

    fields = ["S"] + [str(i) for i in range(4, 14)] + ["700", "55"] + ["0"] * 30
    assert cpu_ticks("812 (ks bpf) (d)) " + " ".join(fields)) == 755


def test_interval_turns_two_scrapes_into_rate_cpu_and_lost() -> None:
    from bench.dropflood import interval, parse_drop_metrics

    before = parse_drop_metrics(METRICS_BEFORE)
    after = parse_drop_metrics(METRICS_BEFORE.replace("} 10.0", "} 1000010.0").replace("lost_total 1.0",
                                                                                        "lost_total 1.0"))
    s = interval(before, after, ticks_before=100, ticks_after=106, seconds=10.0, clk_tck=100)
    assert s["dropped"] == {"nftables/dns": 1_000_000.0}
    assert s["drop_pps"] == pytest.approx(100_000.0)
    assert s["daemon_cpu_pct"] == pytest.approx(0.6) and s["daemon_cpu_s"] == pytest.approx(0.06)
    assert s["events_lost"] == 0.0
    assert interval(before, {"dropped": {}, "lost": None}, 0, 0, 1.0, 100)["events_lost"] is None
    with pytest.raises(ValueError):
        interval(before, after, 0, 0, 0.0, 100)


def _drop_samples() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for rnd, (cpu, idle, pps, lost) in enumerate([(0.6, 0.4, 99_000.0, 0.0), (0.9, 0.5, 98_000.0, 2.0),
                                                  (0.7, 0.3, 97_000.0, 0.0)]):
        out.append({"round": rnd, "phase": "idle", "seconds": 10.0, "drop_pps": 0.0, "daemon_cpu_pct": idle,
                    "events_lost": 0.0})
        out.append({"round": rnd, "phase": "flood", "seconds": 10.0, "drop_pps": pps, "daemon_cpu_pct": cpu,
                    "events_lost": lost, "target_pps": 100_000.0, "sender_attempts_pps": pps + 500})
    out.append({"round": 3, "phase": "flood", "error": "udpbench blast exited 1: boom"})
    return out


def test_drop_flood_summary_takes_medians_and_sums_the_lost() -> None:
    from bench.dropflood import summarize

    row = summarize(_drop_samples())
    assert row is not None
    assert row["samples"] == 3
    assert row["drop_pps"] == 98_000.0 and row["sender_pps"] == 98_500.0
    assert row["daemon_cpu_pct"] == 0.7 and row["daemon_cpu_pct_max"] == 0.9
    assert row["idle_cpu_pct"] == 0.4
    assert row["events_lost"] == 2.0
    assert summarize([s for s in _drop_samples() if s["phase"] == "idle"]) is None


def test_render_markdown_shows_the_drop_flood_next_to_its_rate() -> None:
    md = report.render_markdown({**_results(), "drops": _drop_samples()})
    assert "| 100,000 pps | 98,000 pps | 0.70 % (max 0.90 %) | 0.40 % | 2 |" in md
    assert "Drop flood: `udpbench blast exited 1: boom`" in md
    assert "Dropped-packet flood" not in report.render_markdown(_results())
