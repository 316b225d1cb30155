"""Give sockets that exist already the mark the BPF layer gives new ones.

Imports nothing but the standard library and ksbpf.marks: ksctl's client path uses it.

An exempt cgroup's sockets are told apart by the mark `cgroup/sock_create` gives them at
creation (nftables 1.0.6 cannot match cgroup2, routing sees only marks). A socket made
before that program was attached never gets one: an sshd started at boot alongside
ksbpfd, or a service exempted at run time, listens unmarked, and once ksbpf enforces its
connections are dropped (the admin is locked out until the service restarts). So after
every change that can exempt a running process (`ksctl up`, `reload`, `exempt`, and the
unit's `ExecStartPost=+`), ksctl walks the exempt cgroups, takes each process's inet
sockets with pidfd_getfd(2) and sets SO_MARK on them as `sock_create` would have.

This needs CAP_SYS_PTRACE and the pidfd_getfd system call, which the sandboxed daemon
deliberately lacks (its unit stays at `systemd-analyze security` 2.5): ksctl runs it, as
root outside the sandbox. Where it is refused, nothing is changed and the reason is
returned; enforcement never depends on it (an unmarked socket is blocked, never let out).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids, is_exempt_mark
from ksbpf.procmounts import cgroup2_mount_point

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ksbpf.policy import Policy

SYS_PIDFD_GETFD = 438  # the same number on every architecture (added in 5.6)


@dataclass
class MarkReport:
    marked: int = 0  # sockets given their mark now
    already: int = 0  # sockets that had it
    foreign: int = 0  # sockets with another, non-ksbpf mark: left alone
    processes: int = 0
    refused: list[str] = field(default_factory=list)  # why some could not be reached

    def describe(self) -> str:
        text = f"{self.marked} existing sockets marked, {self.already} already marked"
        if self.foreign:
            text += f", {self.foreign} with another mark left alone"
        if self.refused:
            text += f"; not reached: {'; '.join(sorted(set(self.refused))[:3])}"
        return text


def wanted_marks(policy: Policy) -> dict[str, int]:
    """cgroup path (relative to the cgroup2 mount) -> the mark sock_create gives its
    sockets, for the exempt cgroups and, when the policy names no endpoint mark, the
    endpoint cgroups (which then get DEFAULT_ENDPOINT_MARK). Exemptions win a tie."""
    marks: dict[str, int] = {}
    if policy.tunnel.endpoint_mark is None:
        marks.update({cg: DEFAULT_ENDPOINT_MARK for cg in policy.tunnel.endpoint_cgroups if cg})
    ids = exemption_ids([e.cgroup for e in policy.exemptions])
    marks.update({e.cgroup: exempt_mark(ids[e.cgroup]) for e in policy.exemptions if e.cgroup})
    return marks


def mark_for(rel: str, marks: dict[str, int]) -> int | None:
    """The deepest entry of `marks` at or above cgroup `rel` (a descendant is covered)."""
    parts = rel.split("/")
    for n in range(len(parts), 0, -1):
        mark = marks.get("/".join(parts[:n]))
        if mark is not None:
            return mark
    return None


def _cgroup_dirs(mount: Path, marks: dict[str, int]) -> dict[Path, int]:
    out: dict[Path, int] = {}
    for rel in sorted(marks):
        top = mount / rel
        if not top.is_dir():
            continue  # not made yet: its sockets will be marked at creation
        for dirpath, _dirnames, _files in os.walk(top):
            d = Path(dirpath)
            if d in out:
                continue
            mark = mark_for(str(d.relative_to(mount)), marks)
            if mark is not None:
                out[d] = mark
    return out


def _pidfd_getfd(pidfd: int, target: int) -> int:
    # Imported here, not above: ksctl's client path imports this module and needs
    # ksbpf.linux only when there are sockets to mark.
    from ksbpf.linux.libc import checked, libc

    return checked(libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0), "pidfd_getfd")


def _mark_process(pid: int, mark: int, seen: set[int], report: MarkReport) -> None:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        pidfd = os.pidfd_open(pid)
    except (FileNotFoundError, ProcessLookupError):
        return  # gone meanwhile
    except OSError as e:
        report.refused.append(f"pid {pid}: {e.strerror}")
        return
    report.processes += 1
    try:
        for name in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            inode = int(link[8:-1])
            if inode in seen:
                continue  # the same socket in another process or fd
            seen.add(inode)
            try:
                fd = _pidfd_getfd(pidfd, int(name))
            except OSError as e:
                if e.errno in (errno.EBADF, errno.ESRCH):
                    continue  # closed or exited meanwhile
                report.refused.append(f"pid {pid}: {e.strerror}")
                return
            sock = socket.socket(fileno=fd)  # our duplicate; closing it leaves theirs
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                have = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
                if have == mark:
                    report.already += 1
                elif have == 0 or is_exempt_mark(have) or have == DEFAULT_ENDPOINT_MARK:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                    report.marked += 1
                else:
                    report.foreign += 1  # the application's own mark (e.g. wg's fwmark)
            except OSError as e:
                report.refused.append(f"pid {pid}: SO_MARK: {e.strerror}")
            finally:
                sock.close()
    finally:
        os.close(pidfd)


def mark_existing_sockets(marks: dict[str, int], mount: Path | None = None) -> MarkReport:
    """Mark the existing inet sockets of these cgroups (wanted_marks(policy), or the part
    of it a daemon's reply names) and of their descendants."""
    report = MarkReport()
    if not marks:
        return report
    root = mount if mount is not None else cgroup2_mount_point()
    if root is None:
        report.refused.append("no cgroup2 mount")
        return report
    seen: set[int] = set()
    me = os.getpid()
    for d, mark in _cgroup_dirs(root, marks).items():
        try:
            pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
        except OSError:
            continue
        for pid in pids:
            if pid != me:
                _mark_process(pid, mark, seen, report)
    return report
