"""ksbpf.linux.libc: one libc handle, and C failures as OSErrors that name the call."""

import errno
import os
import subprocess
import sys

import pytest

from ksbpf.linux.libc import LibcError, checked, libc


def test_a_failed_call_raises_its_errno_and_names_the_call() -> None:
    with pytest.raises(LibcError) as info:
        checked(libc.setns(-1, 0), "setns")
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.EBADF and e.call == "setns"
    assert e.reason == os.strerror(errno.EBADF) and e.strerror == f"setns: {e.reason}"


def test_a_successful_call_returns_its_value() -> None:
    r, w = os.pipe()
    try:
        fd = checked(libc.dup(r), "dup")
        assert fd > w
        os.close(fd)
    finally:
        os.close(r)
        os.close(w)


NR_GETPID = {"x86_64": 39, "aarch64": 172, "riscv64": 172}


@pytest.mark.skipif(os.uname().machine not in NR_GETPID, reason="getpid(2)'s number is not listed here")
def test_syscall_goes_through_and_fails_like_the_others() -> None:
    assert checked(libc.syscall(NR_GETPID[os.uname().machine]), "getpid") == os.getpid()
    with pytest.raises(LibcError, match="pidfd_getfd: Bad file descriptor"):
        checked(libc.syscall(438, -1, 0, 0), "pidfd_getfd")


def test_the_module_imports_nothing_but_the_standard_library() -> None:
    code = "import sys, ksbpf.linux.libc; print(sorted(m for m in sys.modules if m.startswith('ksbpf')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ksbpf', 'ksbpf.linux', 'ksbpf.linux.libc']"
