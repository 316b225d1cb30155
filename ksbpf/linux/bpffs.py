"""bpffs at /sys/fs/bpf, where ksbpf pins its maps and programs so that every ksbpf
process on the host (ksctl, ksbpfd, the next start) finds them.

It must be the host's mount. A bpffs mounted inside a private mount namespace (a
sandboxed service's: ProtectSystem= gives ksbpfd one) is seen by nobody else and goes
with that namespace, pins included, while the programs stay attached. So ksbpf mounts
bpffs only where it can tell it shares the mount namespace of the system (the kernel's
initial one, or PID 1's); anywhere else it says what is missing instead. ksbpf.service
runs `python3 -m ksbpf.linux.bpffs` unsandboxed (ExecStartPre=+) before the daemon starts.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from ksbpf.errors import BpfError
from ksbpf.linux.libc import LibcError, checked
from ksbpf.linux.libc import libc as _libc

BPFFS = Path("/sys/fs/bpf")
# The initial mount namespace's fixed inode (include/uapi/linux/nsfs.h, Linux 6.18); on
# older kernels it is allocated like any other, from 0xF0000000 up, so never this value.
MNT_NS_INIT_INO = 0xEFFFFFF8
HOW_TO_MOUNT = f"mount -t bpf bpf {BPFFS}"
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def fs_type(path: Path = BPFFS, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The file system type of the topmost mount at `path` (None: nothing is mounted
    there, it is a directory of the file system around it, or it cannot be read).
    Topmost: a later line of mountinfo mounted over an earlier one."""
    found = None
    try:
        with open(mountinfo, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 10 or _unescape(fields[4]) != str(path):
                    continue
                sep = fields.index("-", 6)
                found = fields[sep + 1]
    except (OSError, ValueError):
        return None
    return found


def is_bpffs(path: Path = BPFFS) -> bool:
    return fs_type(path) == "bpf"


def _ns_inode(pid: str) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def host_mount_namespace() -> tuple[bool, str]:
    """(True, why) when this process shares the system's mount namespace, so a mount made
    here is everyone's; (False, why not) otherwise, also when it cannot be told (a
    sandboxed service may not read /proc/1/ns/mnt)."""
    try:
        mine = _ns_inode("self")
    except OSError as e:
        return False, f"cannot read /proc/self/ns/mnt: {e.strerror}"
    if mine == MNT_NS_INIT_INO:
        return True, "the initial mount namespace"
    try:
        init = _ns_inode("1")
    except OSError as e:
        return False, (f"cannot tell whether this process shares PID 1's mount namespace "
                       f"(/proc/1/ns/mnt: {e.strerror}; a sandboxed service runs in one of its own)")
    if mine == init:
        return True, "PID 1's mount namespace"
    return False, "this process runs in a mount namespace of its own (not PID 1's), where a bpffs would be private"


def what_is_there(path: Path) -> str:
    kind = fs_type(path)
    if kind is not None:
        return f"{kind} is mounted there"
    return "it is not a mount point" if path.is_dir() else "it does not exist"


def ensure_bpffs(path: Path = BPFFS) -> str:
    """Make sure bpffs is mounted at `path`, mounting it when this process shares the
    system's mount namespace. Returns what was done; BpfError says what is missing."""
    if is_bpffs(path):
        return f"bpffs already mounted at {path}"
    ok, why = host_mount_namespace()
    if not ok:
        raise BpfError(f"bpffs is not mounted at {path} ({what_is_there(path)}) and ksbpf will not mount it "
                       f"here: {why}. Mount it in the host's mount namespace first: `{HOW_TO_MOUNT}` "
                       f"(ksbpf.service does so before ksbpfd starts)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BpfError(f"cannot create {path}: {e.strerror} (a read-only /sys: in a container, mount bpffs at "
                       f"{path} from the host, or give the container writable API file systems)") from None
    # As systemd mounts it: no device, setuid or exec files there, pins for root alone.
    try:
        checked(_libc.mount(b"bpf", os.fsencode(str(path)), b"bpf", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"mode=0700"),
                "mount")
    except LibcError as e:
        hint = " (mounting needs CAP_SYS_ADMIN in the host's user namespace)" if e.errno == errno.EPERM else ""
        raise BpfError(f"cannot mount bpffs at {path}: {e.reason}{hint}") from None
    return f"mounted bpffs at {path} ({why})"


def main(argv: list[str] | None = None) -> int:
    """`python3 -m ksbpf.linux.bpffs`: mount bpffs at /sys/fs/bpf unless it is there.
    For ksbpf.service's privileged ExecStartPre=+, which runs in the host's namespace."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python3 -m ksbpf.linux.bpffs (mounts bpffs at /sys/fs/bpf if it is not)", file=sys.stderr)
        return 2
    try:
        print(ensure_bpffs())
    except BpfError as e:
        print(f"ksbpf: {e.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
