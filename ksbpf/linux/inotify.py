"""inotify(7), the little of it the reconciler's cgroup watcher needs: a non-blocking
descriptor to poll, watches added and removed, events read and decoded.

Why not pyroute2.inotify (0.7.x, Debian's python3-pyroute2): it calls inotify_init()
(a blocking, inheritable descriptor), ignores a failed inotify_add_watch (a -1 watch is
kept), cannot remove a watch (unregister_path does nothing), reads 4 KiB at a time, and
looks every event's watch up in its table, so IN_Q_OVERFLOW (watch -1) raises KeyError:
the overflow the watcher must see to re-check everything is lost. Python's standard
library has no inotify, so here it is, over ksbpf.linux.libc.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import NamedTuple

from ksbpf.linux.libc import checked, libc

IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000  # set by the kernel, whatever the mask
IN_ONLYDIR = 0x1000000

_EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
_READ_SIZE = 1 << 16


class InotifyEvent(NamedTuple):
    wd: int  # -1 with IN_Q_OVERFLOW
    mask: int
    cookie: int
    name: str  # the entry of a watched directory; "" for the directory itself


def parse_events(data: bytes) -> list[InotifyEvent]:
    """The events of one read(2). The kernel returns whole events only; a tail too short
    for its header or name is not guessed at."""
    out: list[InotifyEvent] = []
    off = 0
    while off + _EVENT.size <= len(data):
        wd, mask, cookie, ln = _EVENT.unpack_from(data, off)
        end = off + _EVENT.size + ln
        if end > len(data):
            break
        name = data[off + _EVENT.size:end].split(b"\0", 1)[0].decode(errors="replace")
        out.append(InotifyEvent(wd, mask, cookie, name))
        off = end
    return out


class Inotify:
    """One inotify instance: non-blocking and close-on-exec, for a poll/select loop."""

    def __init__(self) -> None:
        self.fd = checked(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: Path, mask: int) -> int:
        """The watch descriptor for `path` (the same one again for a path watched
        already); LibcError when it cannot be watched."""
        return checked(libc.inotify_add_watch(self.fd, os.fsencode(path), mask), "inotify_add_watch")

    def rm_watch(self, wd: int) -> None:
        """Stop watching. A failure leaves nothing to undo: the kernel removed the watch
        already (its directory went: EINVAL), or this instance is closed (EBADF)."""
        with contextlib.suppress(OSError):
            checked(libc.inotify_rm_watch(self.fd, wd), "inotify_rm_watch")

    def read(self) -> list[InotifyEvent]:
        """The events queued now ([] when there are none)."""
        try:
            return parse_events(os.read(self.fd, _READ_SIZE))
        except BlockingIOError:
            return []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
