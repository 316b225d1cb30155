"""`ksctl doctor` says whether ksctl can mark the sockets exempt services made before ksbpf
engaged (pidfd_getfd(2), boot finding F4): a container's seccomp filter that refuses it is
named with the setting that fixes it, and the check is not required (fail closed)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksbpf.doctor import socket_mark_check

REPO = Path(__file__).resolve().parents[2]


def test_allowed_here() -> None:
    c = socket_mark_check(None)
    assert c.ok and not c.required, c


def test_missing_cap_sys_ptrace_is_named() -> None:
    c = socket_mark_check(0)
    assert not c.ok and "CAP_SYS_PTRACE" in c.detail


def _refuse_pidfd_getfd() -> None:
    """preexec_fn: EPERM from pidfd_getfd(2), as systemd-nspawn's default filter gives."""
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    prog = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 0),  # A = seccomp_data.nr
        SockFilter(0x15, 0, 1, 438),  # pidfd_getfd, the same number on every architecture
        SockFilter(0x06, 0, 0, 0x00050000 | 1),  # SECCOMP_RET_ERRNO | EPERM
        SockFilter(0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    )
    fprog = SockFprog(4, prog)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")


@pytest.mark.skipif(sys.platform != "linux", reason="seccomp is Linux's")
def test_a_seccomp_filter_that_refuses_it_is_named_with_the_fix() -> None:
    code = ("from ksbpf.doctor import socket_mark_check; c = socket_mark_check(None); "
            "print(c.ok, c.required, c.detail, sep='|')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=_refuse_pidfd_getfd, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    ok, required, detail = r.stdout.strip().split("|", 2)
    assert (ok, required) == ("False", "False"), r.stdout
    assert "seccomp" in detail and "--system-call-filter='bpf pidfd_getfd'" in detail, detail
