"""Where the nanoseconds go: `perf record -e cpu-clock` on the UDP sender (whose CPU runs
the whole path, the veth peer's receive included), and its samples split into the kill
switch's parts by kernel symbol. Throughput ratios on a shared machine wobble by several
percent; sampled shares of one process's CPU time do not. Parsing is pure."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

# Checked in order: conntrack before the rest of netfilter.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("conntrack", re.compile(r"conntrack|^nf_ct_|^__nf_ct_|^nf_nat|^hash_conntrack|^nf_confirm|^ipv4_confirm")),
    ("nftables", re.compile(r"^(__)?nft_|^nf_hook|^nf_tables|^nf_osf|^nf_reject|^nft")),
    ("cgroup-bpf", re.compile(
        r"^bpf_prog_|^__cgroup_bpf_run_filter_skb|^__bpf_prog_run_save_cb|^__bpf_prog_enter|^__bpf_prog_exit"
        r"|^bpf_skb_load_bytes|^bpf_get_netns_cookie|^bpf_skb_ancestor_cgroup_id|^bpf_skb_cgroup_id"
        r"|^bpf_sk_fullsock|^bpf_sk_storage|^bpf_local_storage|^htab_|^__htab_|^lookup_nulls_elem_raw"
        r"|^trie_lookup_elem|^longest_prefix_match|^array_map_lookup_elem|^bpf_map_lookup_elem|^bpf_sk_storage_get")),
    ("policy routing", re.compile(r"^fib_rules_lookup|^fib4_rule_|^fib6_rule_|^fib_rule_match|^fib_rules_")),
)
_LINE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+\[k\]\s+(\S+)")


def perf_available() -> tuple[bool, str]:
    perf = shutil.which("perf")
    if perf is None:
        return False, "perf is not installed (apt install linux-perf)"
    r = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"perf record fails here: {r.stderr.strip()[-200:]}"
    return True, perf


def parse_report(text: str) -> dict[str, float]:
    """`perf report --no-children --sort symbol --stdio -g none` -> kernel symbol -> % self."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if m:
            out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(1))
    return out


def classify(symbols: Mapping[str, float]) -> dict[str, float]:
    """Kernel symbol shares -> share per kill-switch part (percent of the sender's CPU)."""
    out = {name: 0.0 for name, _ in CATEGORIES}
    for sym, pct in symbols.items():
        for name, pattern in CATEGORIES:
            if pattern.search(sym):
                out[name] += pct
                break
    return out


def top_symbols(symbols: Mapping[str, float], category: str, k: int = 8) -> list[tuple[str, float]]:
    pattern = dict(CATEGORIES)[category]
    mine = [(s, p) for s, p in symbols.items() if pattern.search(s)]
    # A symbol counts for the first category it matches, as in classify().
    mine = [(s, p) for s, p in mine if next(n for n, pat in CATEGORIES if pat.search(s)) == category]
    return sorted(mine, key=lambda sp: -sp[1])[:k]


def record(pid: int, seconds: float, out: Path, perf: str = "perf") -> None:
    subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-F", "4999", "-o", str(out), "-p", str(pid),
                    "--", "sleep", f"{seconds}"], capture_output=True, check=True)


def report(data: Path, perf: str = "perf") -> dict[str, float]:
    r = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--sort", "symbol", "--stdio",
                        "-g", "none", "--percent-limit", "0"], capture_output=True, text=True, check=True)
    return parse_report(r.stdout)
