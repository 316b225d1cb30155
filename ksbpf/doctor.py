"""`ksctl doctor`: can every layer work on this machine, and if not, why not."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ksbpf.errors import KsbpfError


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


def _library(soname: str) -> Check:
    from ksbpf.deps import MissingDependency, load_library

    try:
        load_library(soname)
    except MissingDependency as e:
        return Check(soname, False, str(e))
    return Check(soname, True, "loadable")


def _nft_version() -> Check:
    nft = shutil.which("nft")
    if not nft:
        return Check("nft", False, "not found; install nftables")
    out = subprocess.run([nft, "--version"], capture_output=True, text=True).stdout.strip()
    return Check("nft", True, out)


def _bpf(kernel_source: str | None, prepare: str | None) -> list[Check]:
    """Header tree, BPF environment and a real compile + verifier load (no attach)."""
    try:
        from ksbpf.linux.bpf import environment
    except ImportError as e:
        return [Check("bpf", False, f"BPF layer unavailable: {e}")]
    report = environment.doctor(kernel_source, prepare=prepare)
    # privileges and what a container must provide are checked by collect() itself.
    return [Check(f"bpf: {c.name}", c.ok, c.detail) for c in report.checks if c.name not in _OWN_CHECKS]


_OWN_CHECKS = ("privileges", "cgroup2", "bpffs", "bpf syscall")

# CapEff bits (linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON",
             CAP_BPF: "CAP_BPF"}
NSPAWN = "systemd-nspawn needs --capability=all --system-call-filter=bpf"
DOCKER = "docker needs --privileged (or --cap-add NET_ADMIN,SYS_ADMIN,BPF,PERFMON and a seccomp profile allowing bpf)"


def effective_caps(status: str = "/proc/self/status") -> int | None:
    try:
        with open(status, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return None


def capabilities_check(caps: int | None) -> Check:
    """CAP_NET_ADMIN for every layer; CAP_BPF or CAP_SYS_ADMIN for the BPF layer (BCC and
    querying cgroups' programs also want CAP_SYS_ADMIN, mounting bpffs needs it)."""
    if caps is None:
        return Check("capabilities", False, "cannot read CapEff from /proc/self/status")
    have = [name for bit, name in sorted(CAP_NAMES.items()) if caps >> bit & 1]
    missing = []
    if not caps >> CAP_NET_ADMIN & 1:
        missing.append("CAP_NET_ADMIN (nftables, routing, attaching BPF)")
    if not caps >> CAP_SYS_ADMIN & 1:
        missing.append("CAP_SYS_ADMIN (BPF: loading with BCC, querying cgroups, mounting bpffs)")
    if missing:
        return Check("capabilities", False, f"missing {'; '.join(missing)}: {NSPAWN}; {DOCKER}")
    return Check("capabilities", True, f"CapEff {caps:#x}: {', '.join(have)}")


def sysctl_check(netns_name: str | None) -> Check:
    """The routing layer sets net.ipv4.conf.all.src_valid_mark in the namespace's
    /proc/sys/net: writable there, or already 1."""
    name = "/proc/sys/net"
    try:
        from ksbpf.linux.netns import netns
        from ksbpf.linux.routing import SRC_VALID_MARK, src_valid_mark

        with netns(netns_name):
            is_set, detail = src_valid_mark()
            writable = os.access(SRC_VALID_MARK, os.W_OK)
    except KsbpfError as e:
        return Check(name, False, str(e))
    if writable:
        return Check(name, True, f"writable ({detail})")
    if is_set:
        return Check(name, True, f"read-only, but {detail} is already what the routing layer needs")
    return Check(name, False, (f"read-only and {detail}: the routing layer cannot set it. Give the container a "
                               "writable /proc/sys/net (systemd-nspawn: SYSTEMD_NSPAWN_API_VFS_WRITABLE=yes, or "
                               "--private-network / --network-namespace-path, which make /proc/sys/net writable), "
                               "or have its manager set it (docker --sysctl net.ipv4.conf.all.src_valid_mark=1)"))


def bpf_syscall_check() -> Check:
    """Load a three-instruction probe program (BPF_PROG_LOAD; nothing is attached)."""
    import errno

    try:
        from ksbpf.linux.bpf.kernel import probe_netns_cookie_helper
    except ImportError as e:
        return Check("bpf syscall", False, f"BPF layer unavailable: {e}")
    from ksbpf.deps import MissingDependency

    try:
        helper = probe_netns_cookie_helper()
    except MissingDependency as e:  # libbpf.so.1: its own check names the package
        return Check("bpf syscall", False, f"no libbpf: {e}")
    except OSError as e:
        if e.errno == errno.EPERM:
            return Check("bpf syscall", False, f"bpf system call refused (EPERM): {NSPAWN}; {DOCKER}")
        if e.errno == errno.ENOSYS:
            return Check("bpf syscall", False, "this kernel has no bpf system call (CONFIG_BPF_SYSCALL)")
        return Check("bpf syscall", False, f"loading a probe program failed: {e.strerror}")
    return Check("bpf syscall", True, "programs load" + (" (cgroup_skb has bpf_get_netns_cookie)" if helper else ""))


def cgroup2_check() -> Check:
    from ksbpf.linux.cgroup import cgroup2_mount

    try:
        return Check("cgroup2", True, f"mounted at {cgroup2_mount()}")
    except KsbpfError as e:
        return Check("cgroup2", False, f"{e}; the BPF layer attaches to a cgroup2 cgroup")


def socket_mark_check(caps: int | None) -> Check:
    """ksctl marks the sockets exempt services made before ksbpf engaged (ksbpf.sockmark)
    with pidfd_getfd(2), which needs CAP_SYS_PTRACE and a seccomp filter that allows it.
    Not required: without it such a service stays blocked until it restarts (fail closed)."""
    import errno

    from ksbpf.sockmark import _pidfd_getfd

    name = "pidfd_getfd"
    fix = ("exempt services started before ksbpf engaged stay blocked until they restart. "
           "systemd-nspawn: --system-call-filter='bpf pidfd_getfd'; docker: a seccomp profile that allows "
           "pidfd_getfd, and --cap-add SYS_PTRACE")
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError as e:
        return Check(name, False, f"pidfd_open refused ({e.strerror}): {fix}", required=False)
    r, w = os.pipe()
    try:
        os.close(_pidfd_getfd(pidfd, w))
    except OSError as e:
        why = "refused by a seccomp filter" if e.errno in (errno.EPERM, errno.ENOSYS) else e.strerror
        return Check(name, False, f"{why}: {fix}", required=False)
    finally:
        for fd in (pidfd, r, w):
            os.close(fd)
    if caps is not None and not caps & (1 << 19):  # CAP_SYS_PTRACE: another process's descriptors
        return Check(name, False, f"allowed, but CAP_SYS_PTRACE is missing: {fix}", required=False)
    return Check(name, True, "ksctl can mark the sockets exempt services made before ksbpf engaged", required=False)


def bpffs_check() -> Check:
    try:
        from ksbpf.linux.bpf.environment import bpffs_check as check
    except ImportError as e:
        return Check("bpffs", False, f"BPF layer unavailable: {e}")
    name, ok, detail = check()
    return Check(name, ok, detail)


def _tool(name: str, package: str) -> Check:
    path = shutil.which(name)
    return Check(name, bool(path), path or f"not found; install {package} (needed by `ksctl lab`)", required=False)


def collect(kernel_source: str | None = None, prepare: str | None = None, netns: str | None = None) -> list[Check]:
    """Every check, in dependency order: what any layer needs, what a container must
    provide, then the BPF layer's headers and a trial compile."""
    checks: list[Check] = [
        Check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else "ksbpf needs root"),
        capabilities_check(effective_caps()),
        _nft_version(),
        _import("nftables", "python3-nftables"),
        _import("pyroute2", "python3-pyroute2"),
        _library("libbpf.so.1"),
        sysctl_check(netns),
        cgroup2_check(),
        bpffs_check(),
        bpf_syscall_check(),
        socket_mark_check(effective_caps()),
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
    checks = collect(kernel_source, getattr(args, "prepare_headers", None), getattr(args, "netns", None))
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
