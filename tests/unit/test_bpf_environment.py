"""Pure parts of what the environment gives the BPF layer: which mount is on top at
/sys/fs/bpf, when ksbpf may mount bpffs, how refusals read, and doctor's capability
check. The real mounts and refusals are in tests/kernel/test_environment.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ksbpf import doctor
from ksbpf.errors import BpfError
from ksbpf.linux import bpffs
from ksbpf.linux.bpf.attach import Attached, describe_attached
from ksbpf.linux.bpf.kernel import os_reason

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw
31 23 0:26 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:9 - bpf bpf rw,mode=700
"""
COVERED = MOUNTINFO + "90 31 0:55 / /sys/fs/bpf ro,relatime - tmpfs ksbpf-test ro,size=64k\n"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "mountinfo"
    p.write_text(text)
    return str(p)


def test_fs_type_is_the_topmost_mount(tmp_path: Path) -> None:
    assert bpffs.fs_type(Path("/sys/fs/bpf"), write(tmp_path, MOUNTINFO)) == "bpf"
    # A tmpfs over it hides the bpffs: /proc/mounts still lists "bpf" for the path.
    assert bpffs.fs_type(Path("/sys/fs/bpf"), write(tmp_path, COVERED)) == "tmpfs"
    assert bpffs.fs_type(Path("/sys/fs/bpf"), write(tmp_path, MOUNTINFO.splitlines()[0] + "\n")) is None
    assert bpffs.fs_type(Path("/sys/fs/bpf"), str(tmp_path / "missing")) is None


def _inodes(monkeypatch: pytest.MonkeyPatch, mine: int, init: int | OSError) -> None:
    def ns_inode(pid: str) -> int:
        if pid == "self":
            return mine
        if isinstance(init, OSError):
            raise init
        return init

    monkeypatch.setattr(bpffs, "_ns_inode", ns_inode)


def test_host_mount_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    _inodes(monkeypatch, bpffs.MNT_NS_INIT_INO, OSError(errno.EACCES, "Permission denied"))
    assert bpffs.host_mount_namespace() == (True, "the initial mount namespace")
    _inodes(monkeypatch, 4026532100, 4026532100)
    assert bpffs.host_mount_namespace() == (True, "PID 1's mount namespace")
    _inodes(monkeypatch, 4026532101, 4026532100)
    ok, why = bpffs.host_mount_namespace()
    assert not ok and "mount namespace of its own" in why
    # A sandboxed service cannot read PID 1's namespace: it must not guess.
    _inodes(monkeypatch, 4026532101, OSError(errno.EACCES, "Permission denied"))
    ok, why = bpffs.host_mount_namespace()
    assert not ok and "cannot tell" in why and "Permission denied" in why


def test_ensure_bpffs_never_mounts_in_a_private_namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _inodes(monkeypatch, 4026532101, 4026532100)
    mounted: list[bytes] = []
    monkeypatch.setattr(bpffs._libc, "mount", lambda *a: mounted.append(a[1]) or 0)  # type: ignore[attr-defined, func-returns-value]
    target = tmp_path / "bpf"
    with pytest.raises(BpfError, match="will not mount it here: this process runs in a mount namespace of its own"):
        bpffs.ensure_bpffs(target)
    assert mounted == [] and not target.exists()


def test_ensure_bpffs_names_a_directory_it_cannot_create(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _inodes(monkeypatch, bpffs.MNT_NS_INIT_INO, 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(BpfError, match=r"cannot create .*/file/bpf: Not a directory \(a read-only /sys"):
        bpffs.ensure_bpffs(tmp_path / "file" / "bpf")


def test_bpffs_main_reports_without_a_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bpffs, "is_bpffs", lambda path=bpffs.BPFFS: False)
    _inodes(monkeypatch, 4026532101, 4026532100)
    assert bpffs.main([]) == 1
    assert "ksbpf: bpffs is not mounted at /sys/fs/bpf" in capsys.readouterr().err
    monkeypatch.setattr(bpffs, "is_bpffs", lambda path=bpffs.BPFFS: True)
    assert bpffs.main([]) == 0
    assert bpffs.main(["--bogus"]) == 2


def test_os_reason_names_the_fix_for_eperm() -> None:
    assert os_reason(OSError(errno.EROFS, "Read-only file system", "/sys/fs/bpf/ksbpf")) == \
        "/sys/fs/bpf/ksbpf: Read-only file system"
    reason = os_reason(OSError(errno.EPERM, "attach: Operation not permitted"))
    assert reason.startswith("attach: Operation not permitted (") and "--system-call-filter=bpf" in reason


def test_describe_attached() -> None:
    cg = Path("/sys/fs/cgroup")
    assert describe_attached([Attached("egress", 12, 3, cg), Attached("sock_create", 13, 3, cg)]) == \
        "ks_egress #12 on /sys/fs/cgroup, ks_sock_create #13 on /sys/fs/cgroup"


def test_doctor_capabilities() -> None:
    full = (1 << doctor.CAP_NET_ADMIN) | (1 << doctor.CAP_SYS_ADMIN) | (1 << doctor.CAP_BPF)
    assert doctor.capabilities_check(full).ok
    c = doctor.capabilities_check(full & ~(1 << doctor.CAP_NET_ADMIN))
    assert not c.ok and "missing CAP_NET_ADMIN" in c.detail and "--capability=all" in c.detail
    c = doctor.capabilities_check(1 << doctor.CAP_NET_ADMIN)
    assert not c.ok and "CAP_SYS_ADMIN" in c.detail
    assert not doctor.capabilities_check(None).ok


def test_effective_caps_reads_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tksctl\nCapPrm:\t000001ffffffffff\nCapEff:\t0000000000001000\n")
    assert doctor.effective_caps(str(status)) == 1 << doctor.CAP_NET_ADMIN
    assert doctor.effective_caps(str(tmp_path / "missing")) is None
