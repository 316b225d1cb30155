"""Enter a named network namespace for network-side work, staying in the host's mount
namespace (so the cgroup2 mount stays visible, unlike `ip netns exec`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ksbpf.errors import BackendError
from ksbpf.linux.libc import LibcError, checked, libc

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


def _setns(fd: int) -> None:
    try:
        checked(libc.setns(fd, CLONE_NEWNET), "setns")
    except LibcError as e:
        raise BackendError("netns", f"setns failed: {e.reason}") from None


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
