"""Results: the JSON record (machine, kernel, date, every sample), the README table, the
targets of issue 6, and PNG plots of cost vs n. Everything but the file writes is pure."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import dropflood, profile, stats
from bench.configs import LABELS, SCALED

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

# Issue 6's goals.
UDP_TARGET = 0.90
TCP_TARGET = 0.98
FLAT_TOLERANCE = 0.03  # 10,000 entries within 3% of 1
WARM_UP_S = 0.300
EXEMPT_S = 0.050
RELOAD_S = 0.200


def results_path(directory: Path, when: dt.datetime, kernel: str, quick: bool = False, tag: str = "") -> Path:
    suffix = "".join(f"-{t}" for t in (tag, "quick" if quick else "") if t)
    name = f"{when.strftime('%Y-%m-%d')}-{kernel}{suffix}.json"
    return directory / name


def write_results(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def replace_between_markers(text: str, block: str) -> str | None:
    """`text` with everything between the bench markers replaced by `block`, or None when
    the markers are missing or out of order. Nothing outside them changes."""
    start = text.find(BEGIN)
    end = text.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[: start + len(BEGIN)] + "\n" + block.strip("\n") + "\n" + text[end:]


def update_readme(readme: Path, block: str) -> bool:
    try:
        text = readme.read_text()
    except FileNotFoundError:
        return False
    new = replace_between_markers(text, block)
    if new is None:
        return False
    if new != text:
        readme.write_text(new)
    return True


# ------------------------------------------------------------------ formatting


def _fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * scale:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f" ({value:.3f})"


def _row(row: Mapping[str, Any] | None, metric: str, digits: int, scale: float = 1.0) -> str:
    if row is None:
        return "–"
    return _fmt(row["median"].get(metric), digits, scale) + _ratio(row["ratio"].get(metric))


def _by(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    return {(r["config"], r["n"]): r for r in rows}


def _control_by(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    return {(r["op"], r["n"]): r for r in rows}


def _ns(results: Mapping[str, Any]) -> list[int]:
    return sorted({int(n) for n in results.get("params", {}).get("n", [])} or
                  {int(s["n"]) for s in results.get("dataplane", []) if s["config"] != "none"})


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 6's targets against this run: {"target", "measured", "met"} (met None: not measured)."""
    rows = stats.summarize(results.get("dataplane", []))
    by = _by(rows)
    ns = _ns(results)
    n0, n_max = (ns[0], ns[-1]) if ns else (1, 1)
    out: list[dict[str, Any]] = []

    def ratio(config: str, n: int, metric: str) -> float | None:
        r = by.get((config, n))
        return r["ratio"].get(metric) if r else None

    def add(target: str, measured: float | None, met: bool | None, unit: str = "") -> None:
        out.append({"target": target, "measured": measured, "unit": unit, "met": met})

    k_udp, k_tcp = ratio("ksbpf", n0, "udp_tx_pps"), ratio("ksbpf", n0, "tcp_gbps")
    add(f"UDP 64 B pps ≥ {UDP_TARGET:.2f} × no filtering", k_udp, None if k_udp is None else k_udp >= UDP_TARGET)
    k_cpu = ratio("ksbpf", n0, "udp_pps_per_cpu")
    add(f"UDP 64 B packets per CPU-second ≥ {UDP_TARGET:.2f} × no filtering", k_cpu,
        None if k_cpu is None else k_cpu >= UDP_TARGET)
    add(f"TCP throughput ≥ {TCP_TARGET:.2f} × no filtering", k_tcp, None if k_tcp is None else k_tcp >= TCP_TARGET)
    k_tcpc = ratio("ksbpf", n0, "tcp_gbps_per_cpu")
    add(f"TCP Gbit/s per CPU-second of the sender ≥ {TCP_TARGET:.2f} × no filtering", k_tcpc,
        None if k_tcpc is None else k_tcpc >= TCP_TARGET)
    for metric, name in (("udp_tx_pps", "UDP pps"), ("tcp_gbps", "TCP")):
        k, m = ratio("ksbpf", n0, metric), ratio("mullvad", n0, metric)
        add(f"{name}: better than the Mullvad-style ruleset (ksbpf ÷ Mullvad-style)",
            None if k is None or m is None else k / m, None if k is None or m is None else k > m)
    if n_max != n0:
        for config in ("ksbpf", "nft"):
            for metric, name in (("udp_tx_pps", "UDP pps"), ("udp_pps_per_cpu", "UDP packets per CPU-second")):
                flat = stats.flatness(rows, config, metric)
                # A layer that refused n_max entries is judged at the largest n it took, and says so.
                n = max(flat, default=n_max)
                who = "ksbpf" if config == "ksbpf" else "ksbpf nftables alone"
                refused = f" (refused n={n_max:,})" if n != n_max else ""
                v = flat.get(n) if n != n0 else None
                add(f"{who} at n={n:,} within 3% of n={n0}{refused}: {name}, ratio n={n:,} ÷ n={n0}",
                    v, None if v is None else abs(v - 1) <= FLAT_TOLERANCE)
    ctl = _control_by(stats.summarize_control(results.get("control", [])))
    for op, n, limit, label in (("up_warm", n0, WARM_UP_S, f"warm `ksctl up` (n={n0})"),
                                ("up_warm", n_max, WARM_UP_S, f"warm `ksctl up` (n={n_max:,})"),
                                ("reload_same_rpc", n0, WARM_UP_S, f"warm up through ksbpfd (n={n0})"),
                                ("reload_same_rpc", n_max, WARM_UP_S, f"warm up through ksbpfd (n={n_max:,})"),
                                ("up_daemon", n0, WARM_UP_S, f"warm `ksctl up` with ksbpfd running (n={n0})"),
                                ("up_daemon", n_max, WARM_UP_S, f"warm `ksctl up` with ksbpfd running (n={n_max:,})"),
                                ("exempt", n0, EXEMPT_S, f"`ksctl exempt` (n={n0})"),
                                ("exempt", n_max, EXEMPT_S, f"`ksctl exempt` (n={n_max:,})"),
                                ("exempt_daemon", n0, EXEMPT_S, f"`ksctl exempt` through ksbpfd (n={n0})"),
                                ("exempt_daemon", n_max, EXEMPT_S, f"`ksctl exempt` through ksbpfd (n={n_max:,})"),
                                ("reload", n_max, RELOAD_S, f"reload of a {n_max:,}+{n_max:,}-entry policy"),
                                ("reload_rpc", n_max, RELOAD_S,
                                 f"reload of a {n_max:,}+{n_max:,}-entry policy through ksbpfd"),
                                ("reload_ksctl_daemon", n_max, RELOAD_S,
                                 f"`ksctl reload` of a {n_max:,}+{n_max:,}-entry policy (ksbpfd)")):
        r = ctl.get((op, n))
        if r is None:
            continue
        v = r["median"].get("wall_s")
        add(f"{label} ≤ {limit * 1000:.0f} ms", v, None if v is None else v <= limit, "s")
    return out


def render_markdown(results: Mapping[str, Any], json_path: Path | None = None,
                    pngs: Sequence[Path] = ()) -> str:
    """The README block: data plane at the smallest n, scale vs n, control plane, targets."""
    m = results.get("machine", {})
    p = results.get("params", {})
    rows = stats.summarize(results.get("dataplane", []))
    by = _by(rows)
    errs = stats.errors(results.get("dataplane", []))
    ns = _ns(results)
    n0 = ns[0] if ns else 1
    lines = [
        f"Recorded {results.get('date', '?')[:10]} on {m.get('cpu', '?')} ({m.get('cpus', '?')} vCPUs, "
        f"{m.get('virtualization', '?')}), kernel {results.get('kernel', '?')}, {m.get('nft', '')}, "
        f"ksbpf commit {m.get('ksbpf_commit', '?')}; "
        f"{p.get('rounds', '?')} interleaved rounds of {p.get('seconds', '?')} s per workload, medians; "
        f"in brackets: ratio to no filtering, taken against the no-filtering samples measured right before "
        f"and after each sample. Sender and receiver pinned to different CPUs; the client's veth plays the "
        f"tunnel. UDP: {p.get('udp_size', 64)}-byte payloads, sendmmsg batches of {p.get('udp_batch', 32)}; "
        f"per CPU-second: packets per second of the sender's CPU time (the whole path runs there), "
        f"robust to other load on a shared machine.",
        *(f"\n{note[0].upper()}{note[1:]}." for note in results.get("notes", [])),
        "",
        f"**Data plane** (n = {n0} endpoint and exemption)",
        "",
        "| configuration | TCP Gbit/s | UDP kpps | UDP kpackets per CPU-s | RR p50 µs | RR p99 µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for config in LABELS:
        key = (config, 0 if config == "none" else n0)
        if key not in by and key not in errs:
            continue
        r = by.get(key)
        if r is None:
            lines.append(f"| {LABELS[config]} | refused: {errs[key][:80]} | | | | |")
            continue
        lines.append(
            f"| {LABELS[config]} | {_row(r, 'tcp_gbps', 2)} | {_row(r, 'udp_tx_pps', 0, 1e-3)} | "
            f"{_row(r, 'udp_pps_per_cpu', 0, 1e-3)} | {_row(r, 'rr_p50_us', 1)} | {_row(r, 'rr_p99_us', 1)} |"
        )
    if len(ns) > 1:
        lines += ["", "**Scale**: UDP pps as a ratio to no filtering, by n endpoints + n exemptions "
                  "(per CPU-second in brackets)", "",
                  "| configuration | " + " | ".join(f"n={n:,}" for n in ns) + f" | n={ns[-1]:,} ÷ n={n0} |",
                  "|---|" + "---:|" * (len(ns) + 1)]
        for config in SCALED:
            cells = []
            for n in ns:
                r = by.get((config, n))
                if r is None:
                    cells.append("refused" if (config, n) in errs else "–")
                    continue
                cells.append(f"{_fmt(r['ratio'].get('udp_tx_pps'), 3)} ({_fmt(r['ratio'].get('udp_pps_per_cpu'), 3)})")
            flat = stats.flatness(rows, config, "udp_tx_pps").get(ns[-1])
            flat_cpu = stats.flatness(rows, config, "udp_pps_per_cpu").get(ns[-1])
            lines.append(f"| {LABELS[config]} | " + " | ".join(cells) + f" | {_fmt(flat, 3)} ({_fmt(flat_cpu, 3)}) |")
        scale_errs = sorted({(c, n) for c, n in errs if n != n0})
        for c, n in scale_errs:
            lines.append(f"\n{LABELS.get(c, c)} at n={n:,} refused: `{errs[(c, n)][:160]}`")
    lines += _profile_markdown(results)
    lines += drops_markdown(results)
    lines += _control_markdown(results, ns)
    lines += ["", "**Targets** (issue 6)", "", "| target | measured | met |", "|---|---:|:---:|"]
    for t in targets(results):
        v = t["measured"]
        shown = "–" if v is None else (f"{v * 1000:,.0f} ms" if t["unit"] == "s" else f"{v:.3f}")
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {shown} | {met} |")
    refs = []
    if json_path is not None:
        refs.append(f"every sample: `bench/results/{json_path.name}`")
    refs += [f"![{png.stem}](bench/results/{png.name})" for png in pngs]
    if refs:
        lines += ["", *refs]
    return "\n".join(lines) + "\n"


def _profile_markdown(results: Mapping[str, Any]) -> list[str]:
    rows = stats.summarize_profile(results.get("profile", []))
    if not rows:
        return []
    parts = [p for p, _ in profile.CATEGORIES]
    shown = [p for p in parts if any(r["ns"].get(p, 0) >= 0.5 for r in rows)]
    lines = ["", "**Where the time goes**: `perf record -e cpu-clock` on the UDP sender, whose CPU runs the whole "
             "path; nanoseconds per packet by kernel symbol (medians). *Added* = the parts minus what they show "
             "with no filtering.", "",
             "| configuration | n | CPU ns/packet | " + " | ".join(shown) + " | added |",
             "|---|---:|---:|" + "---:|" * (len(shown) + 1)]
    order = list(LABELS)
    for r in sorted(rows, key=lambda r: (order.index(r["config"]) if r["config"] in order else 99, r["n"])):
        cells = " | ".join(_fmt(r["ns"].get(p), 0) for p in shown)
        lines.append(f"| {LABELS.get(r['config'], r['config'])} | {r['n']:,} | {_fmt(r['ns_per_packet'], 0)} | "
                     f"{cells} | {_fmt(r['attributed_ns'], 0)} |")
    return lines


def drops_markdown(results: Mapping[str, Any]) -> list[str]:
    """The drop flood (issue 11): ksbpfd's CPU next to the drop rate, and the events lost."""
    samples = results.get("drops", [])
    row = dropflood.summarize(samples)
    errs = sorted({s["error"][:160] for s in samples if "error" in s})
    if row is None and not errs:
        return []
    p = results.get("params", {})
    lines = ["", "**Dropped-packet flood**: ksbpfd engaged (all layers, drop events on), a sender in the bench "
             f"cgroup sends {p.get('udp_size', 64)}-byte UDP to a DNS server outside the tunnel out of the "
             "uplink, paced; nftables drops every datagram (reason `dns`) and reports it as a drop event. "
             "Dropped: the drop counters' delta over the interval; ksbpfd's CPU: utime + stime of all its "
             "threads over the same interval (/proc/<pid>/stat), in % of one CPU; at rest: an interval of the "
             f"same length with no sender. Medians of {row['samples'] if row else 0} intervals of "
             f"{_fmt(row['seconds'] if row else None, 0)} s.", "",
             "| sender aims at | dropped | ksbpfd CPU while dropping | ksbpfd CPU at rest | events lost |",
             "|---:|---:|---:|---:|---:|"]
    if row is not None:
        lost = "–" if row["events_lost"] is None else f"{row['events_lost']:,.0f}"
        lines.append(f"| {_fmt(row['target_pps'], 0)} pps | {_fmt(row['drop_pps'], 0)} pps | "
                     f"{_fmt(row['daemon_cpu_pct'], 2)} % (max {_fmt(row['daemon_cpu_pct_max'], 2)} %) | "
                     f"{_fmt(row['idle_cpu_pct'], 2)} % | {lost} |")
    for e in errs:
        lines.append(f"\nDrop flood: `{e}`")
    return lines


def _control_markdown(results: Mapping[str, Any], ns: list[int]) -> list[str]:
    ctl = stats.summarize_control(results.get("control", []))
    if not ctl:
        return []
    by = _control_by(ctl)
    ns = sorted({r["n"] for r in ctl}) or ns
    lines = ["", "**Control plane**: median ms, a fresh `ksctl` process each (what a user waits for); "
             "in-process parts below", "",
             "| operation | " + " | ".join(f"n={n:,}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    ops = [("up_cold", "`ksctl up`, cold (nothing engaged)", "wall_s"),
           ("up_warm", "`ksctl up`, warm (same policy again)", "wall_s"),
           ("reload", "reload (`up` with one endpoint more)", "wall_s"),
           ("exempt", "`ksctl exempt`", "wall_s"),
           ("unexempt", "`ksctl unexempt`", "wall_s"),
           ("down", "`ksctl down`", "wall_s"),
           ("daemon_start", "ksbpfd start → control socket answers (engaged)", "wall_s"),
           ("exempt_daemon", "`ksctl exempt` with ksbpfd running", "wall_s"),
           ("unexempt_daemon", "`ksctl unexempt` with ksbpfd running", "wall_s"),
           ("exempt_rpc", "  exempt request to ksbpfd (no ksctl start)", "wall_s"),
           ("reload_same_rpc", "  reload request, same policy (warm up)", "wall_s"),
           ("reload_rpc", "  reload request, one endpoint more", "wall_s"),
           ("up_daemon", "`ksctl up` with ksbpfd running (its file, unchanged)", "wall_s"),
           ("reload_ksctl_daemon", "`ksctl reload` with ksbpfd running (one endpoint more)", "wall_s"),
           ("daemon_rss", "ksbpfd RSS at rest, MiB", "rss_kb"),
           ("daemon_rss_after_reload", "ksbpfd RSS after a reload, MiB", "rss_kb"),
           ("breakdown", "  parse the policy", "parse_s"),
           ("breakdown", "  render nft JSON", "nft_render_s"),
           ("breakdown", "  nft apply (first)", "nft_apply_cold_s"),
           ("breakdown", "  nft apply (again: unchanged, nothing sent)", "nft_apply_warm_s"),
           ("breakdown", "  nft apply, one endpoint more (set changes)", "nft_apply_changes_s"),
           ("breakdown", "  nft status (lists the table)", "nft_status_s"),
           ("breakdown", "  nft counters read", "nft_read_counters_s"),
           ("breakdown", "  nft exemption change (what `ksctl exempt` sends)", "nft_change_exemption_s"),
           ("breakdown", "  routing apply", "routing_apply_s"),
           ("breakdown", "  BPF apply (all)", "bpf_apply_s"),
           ("breakdown", "  BCC compile (clang/LLVM)", "bcc_compile_s"),
           ("breakdown", "  BPF verifier load", "bpf_load_s"),
           ("breakdown", "  BPF exemption maps update", "bpf_update_exemptions_s")]
    for op, label, key in ops:
        cells = []
        for n in ns:
            r = by.get((op, n))
            v = r["median"].get(key) if r else None
            if v is None:
                cells.append("–")
            elif key == "rss_kb":
                cells.append(_fmt(v / 1024, 1))
            else:
                cells.append(_fmt(v, 0 if v >= 0.1 else 1, 1000))
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    proc = results.get("process")
    if proc:
        imports = ", ".join(f"`import {m}` {v * 1000:.0f} ms" for m, v in proc.get("import_s", {}).items())
        lines.append(f"\nProcess floor: `ksctl --version` {proc['ksctl_version_s'] * 1000:.0f} ms, "
                     f"bare `python -c pass` {proc['python_bare_s'] * 1000:.0f} ms; {imports}.")
    daemon_errs = sorted({s["error"][:160] for s in results.get("control", [])
                          if s.get("op", "").startswith(("daemon", "exempt_rpc", "reload")) and "error" in s})
    for e in daemon_errs:
        lines.append(f"\nksbpfd: `{e}`")
    partial = sorted({(s["op"], s["n"]) for s in results.get("control", []) if "partial" in s})
    if partial:
        lines.append("\nPartial (a layer refused, the time is without it): " +
                     ", ".join(f"{op} n={n:,}" for op, n in partial) + ".")
    return lines


# ------------------------------------------------------------------ plots


def plots(results: Mapping[str, Any], stem: Path) -> list[Path]:
    """Cost vs n (data plane) and time vs n (control plane) as PNGs next to the JSON.
    Without matplotlib (apt install python3-matplotlib) there are no plots, and the run says so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out: list[Path] = []
    rows = stats.summarize(results.get("dataplane", []))
    ns = _ns(results)
    if len(ns) > 1 and rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, title in ((axes[0], "udp_tx_pps", "UDP 64 B pps"),
                                  (axes[1], "udp_pps_per_cpu", "UDP 64 B packets per CPU-second")):
            for config in SCALED:
                pts = sorted((r["n"], r["ratio"][metric]) for r in rows
                             if r["config"] == config and metric in r["ratio"])
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=LABELS[config])
            for config, style in (("wgquick", ":"), ("routing", "--")):
                r = next((r for r in rows if r["config"] == config and metric in r["ratio"]), None)
                if r:
                    ax.axhline(r["ratio"][metric], linestyle=style, color="grey", linewidth=1)
                    ax.annotate(LABELS[config], (ns[0], r["ratio"][metric]), fontsize=7, color="grey",
                                xytext=(2, 2), textcoords="offset points")
            ax.axhline(UDP_TARGET, color="red", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("n endpoints + n exemptions")
            ax.set_ylabel("ratio to no filtering")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"per-packet cost vs n — kernel {results.get('kernel', '')}, {results.get('date', '')[:10]}")
        fig.tight_layout()
        path = Path(f"{stem}-dataplane.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    ctl = stats.summarize_control(results.get("control", []))
    if len({r["n"] for r in ctl}) > 1:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for op, label in (("up_cold", "ksctl up, cold"), ("up_warm", "ksctl up, warm"), ("reload", "reload"),
                          ("exempt", "ksctl exempt"), ("down", "ksctl down")):
            pts = sorted((r["n"], r["median"]["wall_s"] * 1000) for r in ctl if r["op"] == op and "wall_s" in r["median"])
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        for limit, label in ((WARM_UP_S, "up target"), (RELOAD_S, "reload target"), (EXEMPT_S, "exempt target")):
            ax.axhline(limit * 1000, color="red", linewidth=0.6, linestyle=":")
            ax.annotate(label, (1, limit * 1000), fontsize=7, color="red")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n endpoints + n exemptions")
        ax.set_ylabel("ms (median, fresh process)")
        ax.set_title("control plane vs n")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(f"{stem}-control.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out
