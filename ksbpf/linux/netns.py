"""Enter a named network namespace for network-side work, staying in the host's mount
namespace (so the cgroup2 mount stays visible, unlike `ip netns exec`)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ksbpf.errors import BackendError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise BackendError("netns", f"setns failed: {os.strerror(err)}")


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise BackendError("netns", f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


@contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Run the body in network namespace `name` (None: stay where we are). Only this
    thread moves; sockets opened inside stay bound to that namespace."""
    if name is None:
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BackendError("netns", f"network namespace {name!r}: {e.strerror}") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
