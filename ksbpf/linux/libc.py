"""The C library, for the few system calls Python's os module lacks (setns, mount,
pidfd_getfd, inotify, bpf, membarrier): opened once for the whole package.

Standard library only, and cheap to import: ksctl's light client path (ksbpf.sockmark)
reaches it when it marks existing sockets.

    from ksbpf.linux.libc import checked, libc
    fd = checked(libc.inotify_init1(flags), "inotify_init1")
"""

from __future__ import annotations

import ctypes
import os

# use_errno: ctypes copies errno right after each call, so ctypes.get_errno() is this
# thread's value for the last call, not one clobbered by the interpreter meanwhile.
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long  # syscall(2) returns long; the default int truncates


class LibcError(OSError):
    """A C call failed: `errno` is always set, `call` names the call, `reason` is the bare
    strerror (`strerror` is "call: reason", like the bpf(2) wrapper's errors)."""

    errno: int
    strerror: str

    def __init__(self, call: str, err: int) -> None:
        super().__init__(err, f"{call}: {os.strerror(err)}")
        self.call = call
        self.reason = os.strerror(err)


def checked(ret: int, call: str) -> int:
    """`ret` of a C call that returns -1 and sets errno on failure: `ret` itself, or a
    LibcError carrying that errno and naming `call`."""
    if ret < 0:
        raise LibcError(call, ctypes.get_errno())
    return ret
