"""What the BPF layer needs of the host, for doctor and status: bpffs, bpf(2) allowed,
the probes' answers, the netns cookie, a trial compile, and `ksctl doctor`'s BPF report."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

from ksbpf.deps import MissingDependency
from ksbpf.errors import BpfError, KsbpfError
from ksbpf.linux import bpffs, headers
from ksbpf.linux.bpf.kernel import os_reason, probe_netns_cookie_helper, probe_sock_task_helpers
from ksbpf.linux.bpf.layout import EVENTS_BYTES
from ksbpf.linux.bpf.loader import LoadStats, _run_loader, cflags, nft_events_build
from ksbpf.linux.bpffs import BPFFS
from ksbpf.linux.cgroup import cgroup2_mount
from ksbpf.linux.libbpf import prog_ids
from ksbpf.linux.netns import netns

_SO_NETNS_COOKIE = 71


def netns_cookie(name: str | None) -> int:
    """The cookie of a named netns (None: this thread's), as BPF's bpf_get_netns_cookie sees it."""
    with netns(name):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
    return int(struct.unpack("<Q", raw)[0])


def bpffs_mounted() -> bool:
    return bpffs.is_bpffs(BPFFS)


def bpf_usable() -> bool:
    """May this process use bpf(2) at all (not refused by a seccomp filter or missing
    capabilities)?"""
    try:
        next(prog_ids(), None)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOSYS):
            return False
        raise BpfError(f"cannot list BPF programs: {os_reason(e)}") from None
    return True


def environment_checks() -> list[tuple[str, bool, str]]:
    """What BPF needs besides headers, as (check, ok, detail), in dependency order."""
    import importlib.util

    checks: list[tuple[str, bool, str]] = []
    try:
        checks.append(("cgroup2", True, f"mounted at {cgroup2_mount()}"))
    except KsbpfError as e:
        checks.append(("cgroup2", False, str(e)))
    spec = importlib.util.find_spec("bcc")
    checks.append(("bcc", spec is not None,
                   f"python module at {spec.origin}" if spec else
                   "python3-bpfcc is not importable (apt install python3-bpfcc; venv needs --system-site-packages)"))
    checks.append(bpffs_check())
    if os.geteuid() == 0:
        try:
            helper = probe_netns_cookie_helper()
            checks.append(("netns keying", True, "bpf_get_netns_cookie in cgroup_skb" if helper else
                           "per-socket netns record (cgroup_skb lacks bpf_get_netns_cookie before 6.15)"))
        except OSError as e:
            checks.append(("bpf syscall", False, f"loading a probe program failed: {os_reason(e)}"))
        except MissingDependency as e:  # no libbpf.so.1
            checks.append(("bpf syscall", False, str(e)))
    return checks


def bpffs_check() -> tuple[str, bool, str]:
    """Is bpffs at /sys/fs/bpf, with room for pins, or can `ksctl up` mount it here?"""
    if bpffs_mounted():
        if not os.access(BPFFS, os.W_OK):
            return "bpffs", False, f"mounted at {BPFFS} but not writable (read-only mount): pins cannot be made"
        return "bpffs", True, f"mounted at {BPFFS}"
    ok, why = bpffs.host_mount_namespace()
    if not ok:
        return "bpffs", False, (f"not mounted at {BPFFS} ({bpffs.what_is_there(BPFFS)}), and not mountable from here: {why}; "
                                f"mount it on the host: `{bpffs.HOW_TO_MOUNT}`")
    if not BPFFS.is_dir() and not os.access(BPFFS.parent, os.W_OK):
        return "bpffs", False, (f"not mounted, and {BPFFS} cannot be created ({BPFFS.parent} is read-only): "
                                f"a container needs bpffs mounted at {BPFFS} by its manager or writable API "
                                "file systems (systemd-nspawn: SYSTEMD_NSPAWN_API_VFS_WRITABLE=yes)")
    return "bpffs", True, f"not mounted; `ksctl up` mounts it at {BPFFS} ({why})"


def trial_compile(source: headers.KernelSource, netns_mode: str = "auto") -> LoadStats:
    """Compile and verifier-load the programs without pinning or attaching anything."""
    mode = netns_mode if netns_mode != "auto" else ("helper" if probe_netns_cookie_helper() else "sk_storage")
    nft, why = nft_events_build()
    return _run_loader(source, mode, cflags(mode, None, None, EVENTS_BYTES, nft, probe_sock_task_helpers()), None,
                       nft, why)


def doctor(
    setting: str | None = None,
    *,
    prepare: Path | str | None = None,
    compile_check: bool = True,
) -> headers.DoctorReport:
    """Can BCC compile the ksbpf programs here, and if not, why not.

    `prepare` first builds a merged Debian header tree there (and uses it unless the
    policy or BCC_KERNEL_SOURCE names another). `compile_check` runs a real compile and
    verifier load of the programs in a child process, without attaching anything.
    """
    report = headers.DoctorReport()
    release = headers.kernel_release()
    report.add("kernel", True, f"{release} ({os.uname().machine})")
    report.add("privileges", os.geteuid() == 0, "root" if os.geteuid() == 0 else "loading BPF needs root")

    prepared_at = Path(prepare) if prepare else headers.DEFAULT_HEADERS_DIR
    if prepare:
        try:
            src = headers.prepare_headers(prepared_at, release=release)
            report.add("prepare headers", True, f"merged tree at {src.describe()}")
        except (OSError, FileNotFoundError) as e:
            report.add("prepare headers", False, str(e))

    lookup = headers.resolve_kernel_source(setting, release=release, prepared=prepared_at)
    report.source = lookup.source
    if lookup.source is None:
        report.add("kernel headers", False, lookup.explain() +
                   " — install linux-headers for this kernel, run `ksctl doctor --prepare-headers "
                   f"{headers.DEFAULT_HEADERS_DIR}`, or set [bpf] kernel_source / {headers.ENV_VAR}")
    else:
        note = ""
        if lookup.source.release and lookup.source.release != release:
            note = (f"; headers are {lookup.source.release}, kernel is {release}: fine for these "
                    "programs (stable UAPI only)")
        report.add("kernel headers", True, lookup.source.describe() + note)

    for name, ok, detail in environment_checks():
        report.add(name, ok, detail)

    if compile_check and report.ok and lookup.source is not None:
        try:
            stats = trial_compile(lookup.source)
            report.add("compile + verifier", True,
                       f"compiled in {stats.compile_s:.2f}s, loaded in {stats.load_s:.3f}s "
                       f"({stats.netns_mode} netns mode), loader peak RSS {stats.peak_rss_kb // 1024} MiB")
        except BpfError as e:
            report.add("compile + verifier", False, e.reason)
    return report


def doctor_checks(setting: str | None = None, *, compile_check: bool = True) -> list[tuple[str, bool, str]]:
    """The BPF-specific part of `ksctl doctor` as (check, ok, detail): which header tree
    and why, how the program tells netns apart, and a real compile + verifier load."""
    report = doctor(setting, compile_check=compile_check)
    skip = {"kernel", "privileges", "cgroup2", "bcc", "bpffs"}  # the CLI's doctor checks these itself
    return [(c.name, c.ok, c.detail) for c in report.checks if c.name not in skip]
