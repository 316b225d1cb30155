"""`ksctl doctor`: can every layer work on this machine, and if not, why not."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # False: only the lab or an optional feature needs it


def _import(module: str, package: str) -> Check:
    try:
        __import__(module)
    except ImportError as e:
        return Check(module, False, f"not importable ({e}); install Debian's {package}")
    return Check(module, True, "importable")


def _nft_version() -> Check:
    nft = shutil.which("nft")
    if not nft:
        return Check("nft", False, "not found; install nftables")
    out = subprocess.run([nft, "--version"], capture_output=True, text=True).stdout.strip()
    return Check("nft", True, out)


def _bpf(kernel_source: str | None, prepare: str | None) -> list[Check]:
    """Header tree, BPF environment and a real compile + verifier load (no attach)."""
    try:
        from ksbpf.linux import headers
    except ImportError as e:
        return [Check("bpf", False, f"BPF layer unavailable: {e}")]
    report = headers.doctor(kernel_source, prepare=prepare)
    # kernel release and privileges are reported here too; keep the BPF-specific lines.
    return [Check(f"bpf: {c.name}", c.ok, c.detail) for c in report.checks if c.name not in ("privileges",)]


def _tool(name: str, package: str) -> Check:
    path = shutil.which(name)
    return Check(name, bool(path), path or f"not found; install {package} (needed by `ksctl lab`)", required=False)


def collect(kernel_source: str | None = None, prepare: str | None = None) -> list[Check]:
    checks: list[Check] = [
        Check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else "ksbpf needs root"),
        _nft_version(),
        _import("nftables", "python3-nftables"),
        _import("pyroute2", "python3-pyroute2"),
        *_bpf(kernel_source, prepare),
    ]
    optional: list[Callable[[], Check]] = [
        lambda: _tool("wireguard-go", "wireguard-go"),
        lambda: _tool("wg", "wireguard-tools"),
        lambda: Check("systemd", _importable("systemd.daemon"), "systemd-python for the daemon's sd_notify", required=False),
        lambda: Check("prometheus_client", _importable("prometheus_client"), "for the daemon's metrics", required=False),
    ]
    return checks + [f() for f in optional]


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_doctor(args: argparse.Namespace) -> int:
    kernel_source = None
    if getattr(args, "config", None):
        from ksbpf.policy import load_policy

        kernel_source = load_policy(args.config).bpf.kernel_source
    checks = collect(kernel_source, getattr(args, "prepare_headers", None))
    width = max(len(c.name) for c in checks)
    for c in checks:
        status = "ok" if c.ok else ("FAIL" if c.required else "missing")
        print(f"{status:<7} {c.name:<{width}}  {c.detail}")
    failed = [c.name for c in checks if c.required and not c.ok]
    if failed:
        print(f"\nnot ready: {', '.join(failed)}")
        return 1
    print("\nall three layers can engage here")
    return 0
