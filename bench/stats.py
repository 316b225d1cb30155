"""Medians and ratios over the bench's samples. Pure.

A data-plane sample is one configuration measured once: {"round", "seq", "config", "n",
"metrics": {name: value}}. "none" (no filtering) is measured between the others, so each
sample is compared with the no-filtering samples right before and after it in the same
run: on a shared machine the load drifts, and a ratio to a baseline measured minutes
earlier would measure the drift.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BASELINE = "none"
# Bigger is better for these; for the rest (latencies) smaller is.
THROUGHPUT = ("tcp_gbps", "tcp_gbps_per_cpu", "udp_tx_pps", "udp_rx_pps", "udp_pps_per_cpu")
LATENCY = ("rr_p50_us", "rr_p99_us", "rr_mean_us")
METRICS = THROUGHPUT + LATENCY


def median(values: Iterable[float]) -> float:
    v = sorted(values)
    if not v:
        return math.nan
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def quantile(values: Iterable[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _bracket(baselines: Sequence[Mapping[str, Any]], seq: int, metric: str) -> float | None:
    """Mean of the closest baseline sample before and after `seq` (or the one there is)."""
    before = [b for b in baselines if b["seq"] < seq and metric in b["metrics"]]
    after = [b for b in baselines if b["seq"] > seq and metric in b["metrics"]]
    near = []
    if before:
        near.append(max(before, key=lambda b: b["seq"])["metrics"][metric])
    if after:
        near.append(min(after, key=lambda b: b["seq"])["metrics"][metric])
    if not near:
        return None
    return float(sum(near) / len(near))


def with_ratios(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each sample plus "ratios": metric / the bracketing no-filtering value."""
    baselines = [s for s in samples if s["config"] == BASELINE]
    out = []
    for s in samples:
        ratios: dict[str, float] = {}
        for metric, value in s["metrics"].items():
            if metric not in METRICS:
                continue
            ref = _bracket(baselines, s["seq"], metric) if s["config"] != BASELINE else value
            if ref:
                ratios[metric] = value / ref
        out.append({**s, "ratios": ratios})
    return out


def summarize(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, n): medians of every metric and of every ratio, and counts."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for s in with_ratios(samples):
        if "error" in s:
            continue
        groups[(s["config"], int(s["n"]))].append(s)
    rows = []
    for (config, n), group in sorted(groups.items(), key=lambda kv: (kv[0][0] != BASELINE, kv[0][0], kv[0][1])):
        metrics: dict[str, float] = {}
        ratios: dict[str, float] = {}
        spread: dict[str, list[float]] = {}
        for m in METRICS:
            vals = [g["metrics"][m] for g in group if m in g["metrics"]]
            rats = [g["ratios"][m] for g in group if m in g.get("ratios", {})]
            if vals:
                metrics[m] = median(vals)
            if rats:
                ratios[m] = median(rats)
                spread[m] = [quantile(rats, 0.25), quantile(rats, 0.75)]
        rows.append({"config": config, "n": n, "samples": len(group), "median": metrics,
                     "ratio": ratios, "ratio_iqr": spread})
    return rows


def errors(samples: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], str]:
    """(config, n) -> the first error a configuration met (e.g. a layer refusing n entries)."""
    out: dict[tuple[str, int], str] = {}
    for s in samples:
        if "error" in s:
            out.setdefault((s["config"], int(s["n"])), str(s["error"]))
    return out


def summarize_control(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Control-plane samples {"op", "n", "wall_s", ...} -> medians per (op, n)."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for s in samples:
        if "error" not in s:
            groups[(s["op"], int(s["n"]))].append(s)
    rows = []
    for (op, n), group in sorted(groups.items()):
        keys = sorted({k for g in group for k, v in g.items() if isinstance(v, (int, float))} - {"n", "round"})
        rows.append({"op": op, "n": n, "samples": len(group),
                     "median": {k: median(g[k] for g in group if k in g) for k in keys}})
    return rows


def flatness(rows: Sequence[Mapping[str, Any]], config: str, metric: str) -> dict[int, float]:
    """n -> median ratio at n / median ratio at the smallest n, for one configuration:
    1.0 means entries cost nothing per packet."""
    mine = sorted((r for r in rows if r["config"] == config and metric in r["ratio"]), key=lambda r: r["n"])
    if not mine:
        return {}
    ref = mine[0]["ratio"][metric]
    return {int(r["n"]): r["ratio"][metric] / ref for r in mine}


def summarize_profile(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Profile samples {"config", "n", "ns_per_packet", "ns": {part: ns}} -> medians per
    (config, n), and "attributed": the parts' sum minus what the same parts show with no
    filtering (other tenants' BPF programs, say), i.e. what the configuration adds."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for s in samples:
        if "error" not in s:
            groups[(s["config"], int(s["n"]))].append(s)
    parts = sorted({p for s in samples for p in s.get("ns", {})})

    def med(group: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        return {p: median(g["ns"].get(p, 0.0) for g in group) for p in parts}

    floor = med(groups.get((BASELINE, 0), []))
    rows = []
    for (config, n), group in sorted(groups.items(), key=lambda kv: (kv[0][0] != BASELINE, kv[0][0], kv[0][1])):
        ns = med(group)
        rows.append({
            "config": config, "n": n, "samples": len(group),
            "ns_per_packet": median(g["ns_per_packet"] for g in group),
            "ns": ns,
            "attributed_ns": sum(max(0.0, ns[p] - floor.get(p, 0.0)) for p in parts),
        })
    return rows
