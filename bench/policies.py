"""What the bench enforces, as text: ksbpf policies and the baselines' rulesets with n
endpoints and exemptions. Pure: no I/O but reading the baseline files."""

from __future__ import annotations

import ipaddress
import json
from importlib import resources
from pathlib import Path

ENDPOINT_BASE = ipaddress.IPv4Address("198.18.0.0")  # RFC 2544 benchmarking range
EXEMPT_TO_BASE = ipaddress.IPv4Address("100.64.0.0")
ENDPOINT_PORT = 51820
ENDPOINT_MARK = 0xCA6C
# name -> (file in bench/baselines, its table). "hooks" and "minimal" are reference floors.
BASELINES = {
    "wgquick": ("wg-quick.nft", "ksbench_wgquick"),
    "mullvad": ("mullvad-style.nft", "ksbench_mullvad"),
    "hooks": ("empty-hooks.nft", "ksbench_hooks"),
    "minimal": ("minimal-set-rule.nft", "ksbench_minimal"),
}


def endpoint_address(i: int) -> str:
    return str(ENDPOINT_BASE + 1 + i)


def exempt_to(i: int) -> str:
    return f"{EXEMPT_TO_BASE + 1 + i}/32"


def exempt_cgroup(root: str, i: int) -> str:
    return f"{root}/ex/{i}"


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def policy_text(
    tunnel_if: str,
    dns: str,
    bpf_cgroup: str,
    n: int,
    kernel_source: str | None = None,
    extra_endpoints: int = 0,
    metrics_listen: str | None = None,
) -> str:
    """A policy with n (+ extra) endpoints and n exemptions, exemption i for the cgroup
    <bpf_cgroup>/ex/i allowing tcp/443 to its own /32."""
    endpoints = [f"{endpoint_address(i)}:{ENDPOINT_PORT}/udp" for i in range(n + extra_endpoints)]
    lines = [
        "[tunnel]",
        f"interfaces = {_toml_list([tunnel_if])}",
        f"endpoints = {_toml_list(endpoints)}",
        f"endpoint_mark = {ENDPOINT_MARK:#x}",
        "",
        "[dns]",
        f"servers = {_toml_list([dns])}",
        "",
        "[bpf]",
        f"cgroup = {json.dumps(bpf_cgroup)}",
    ]
    if kernel_source:
        lines.append(f"kernel_source = {json.dumps(kernel_source)}")
    if metrics_listen:
        lines += ["", "[metrics]", f"listen = {json.dumps(metrics_listen)}"]
    for i in range(n):
        lines += [
            "",
            "[[exempt]]",
            f"cgroup = {json.dumps(exempt_cgroup(bpf_cgroup, i))}",
            'allow = ["tcp/443"]',
            f"to = {_toml_list([exempt_to(i)])}",
        ]
    return "\n".join(lines) + "\n"


def baseline_path(name: str) -> Path:
    return Path(str(resources.files("bench") / "baselines" / BASELINES[name][0]))


def baseline_table(name: str) -> str:
    return BASELINES[name][1]


def baseline_defines(tunnel_if: str, dns: str) -> dict[str, str]:
    return {"TUNNEL": json.dumps(tunnel_if), "MARK": f"{ENDPOINT_MARK:#x}", "DNS": dns}


def baseline_text(name: str, n: int) -> str:
    """The baseline file, plus (Mullvad-style) one rule per endpoint in each direction."""
    text = baseline_path(name).read_text()
    if name != "mullvad":
        return text
    table = baseline_table(name)
    rules = []
    for i in range(n):
        addr = endpoint_address(i)
        rules.append(f"add rule inet {table} relays_out ip daddr {addr} udp dport {ENDPOINT_PORT} meta mark $MARK accept")
        rules.append(f"add rule inet {table} relays_in ip saddr {addr} udp sport {ENDPOINT_PORT} accept")
    return text + "\n" + "\n".join(rules) + "\n"
