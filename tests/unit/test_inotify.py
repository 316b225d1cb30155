"""ksbpf.linux.inotify: events decoded from what read(2) returns, and a real instance
(the cgroup watcher's use of it is in test_control_reconcile.py)."""

from __future__ import annotations

import os
import select
import struct
from pathlib import Path

import pytest

from ksbpf.linux import inotify as ino
from ksbpf.linux.libc import LibcError


def event(wd: int, mask: int, name: bytes = b"", padded_to: int = 0) -> bytes:
    raw = name + b"\0" * (padded_to - len(name)) if padded_to else name
    return struct.pack("=iIII", wd, mask, 0, len(raw)) + raw


def test_events_with_padded_names_and_an_overflow() -> None:
    data = event(1, ino.IN_CREATE, b"a.service", 16) + event(-1, ino.IN_Q_OVERFLOW) + event(2, ino.IN_DELETE_SELF)
    assert ino.parse_events(data) == [
        ino.InotifyEvent(1, ino.IN_CREATE, 0, "a.service"),
        ino.InotifyEvent(-1, ino.IN_Q_OVERFLOW, 0, ""),  # the overflow has no watch: it must still be seen
        ino.InotifyEvent(2, ino.IN_DELETE_SELF, 0, ""),
    ]


def test_a_truncated_tail_is_not_guessed_at() -> None:
    whole = event(1, ino.IN_CREATE, b"x", 16)
    assert ino.parse_events(whole + event(3, ino.IN_CREATE, b"y", 16)[:20]) == [ino.InotifyEvent(1, ino.IN_CREATE, 0, "x")]
    assert ino.parse_events(whole[:10]) == []


def test_a_real_instance_is_non_blocking_and_removes_its_watches(tmp_path: Path) -> None:
    i = ino.Inotify()
    try:
        assert i.read() == []  # nothing queued: no wait
        wd = i.add_watch(tmp_path, ino.IN_CREATE | ino.IN_ONLYDIR)
        (tmp_path / "new").mkdir()
        assert select.select([i], [], [], 5)[0] == [i]
        got = i.read()
        assert [(e.wd, e.name) for e in got] == [(wd, "new")] and got[0].mask & ino.IN_CREATE
        i.rm_watch(wd)
        assert [e.mask & ino.IN_IGNORED for e in i.read()] == [ino.IN_IGNORED]
        i.rm_watch(wd)  # gone already: no error
        with pytest.raises(LibcError, match="inotify_add_watch: No such file or directory"):
            i.add_watch(tmp_path / "missing", ino.IN_CREATE)
        assert os.get_inheritable(i.fileno()) is False
    finally:
        i.close()
