"""The consumer side of the drop-event ring buffer (BPF_MAP_TYPE_RINGBUF), in Python with
mmap: ksbpfd reads events without BCC or libbpf's ring buffer code.

Layout (kernel/bpf/ringbuf.c): page 0 of the map's mmap is the consumer position (ours to
write); from page 1 on, read-only, the producer position, then the data pages, mapped twice
in a row so that a record never wraps. A record is an 8-byte header (u32 length with the
BUSY and DISCARD bits, u32 page offset) and its data, padded to 8 bytes. The map's fd polls
readable when records are there.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ksbpf.errors import BpfError, KsbpfError
from ksbpf.events import (
    BadRecord,
    Coalescer,
    DropEvent,
    WatchHub,
    journal_fields,
    journal_message,
    named,
    parse_record,
)
from ksbpf.linux.bpf.kernel import MAP_RINGBUF, BpfMap, os_reason
from ksbpf.linux.bpf.layout import EVENTS_FLUSH_PIN, EVENTS_PIN, EVENTS_RATE_PIN
from ksbpf.linux.cgroup import cgroup2_mount, ids_by_path
from ksbpf.linux.libbpf import map_info, obj_get, prog_test_run

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBuffer:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.fd = obj_get(self.path)
        except OSError as e:
            raise BpfError(f"cannot open the event ring buffer {self.path}: {os_reason(e)}") from None
        try:
            info = map_info(self.fd)
            if info.type != MAP_RINGBUF:
                raise BpfError(f"{self.path} is not a ring buffer (map type {info.type})")
            self.size = info.max_entries
            page = mmap.PAGESIZE
            self._cons = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._prod = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except OSError as e:
            os.close(self.fd)
            raise BpfError(f"cannot map the event ring buffer {self.path}: {os_reason(e)}") from None
        except BaseException:
            os.close(self.fd)
            raise
        self._page = page

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
        os.close(self.fd)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, limit: int = 4096) -> list[bytes]:
        """The records ready now (at most `limit`), consumed."""
        out: list[bytes] = []
        cons = struct.unpack_from("<Q", self._cons, 0)[0]
        prod = struct.unpack_from("<Q", self._prod, 0)[0]
        mask = self.size - 1
        while cons < prod and len(out) < limit:
            at = self._page + (cons & mask)
            hdr = struct.unpack_from("<I", self._prod, at)[0]
            if hdr & _BUSY:
                break  # reserved, not yet submitted: later records wait for it
            n = hdr & ~(_BUSY | _DISCARD)
            if not hdr & _DISCARD:
                out.append(self._prod[at + _HDR:at + _HDR + n])
            cons += (n + _HDR + 7) & ~7
        struct.pack_into("<Q", self._cons, 0, cons)
        return out

    def wait(self, timeout: float) -> bool:
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(max(0, int(timeout * 1000))))


class EventReader:
    """A thread reading the ring buffer and handing batches of records to `deliver`. It
    wakes on the map's fd (an event reaches its reader within milliseconds) and at least
    every `tick` seconds, when `deliver` also gets an empty batch (for timed work such as
    the journal's coalescer)."""

    def __init__(self, path: Path | str, deliver: Callable[[list[bytes]], None], tick: float = 0.5) -> None:
        self.ring = RingBuffer(path)
        self.deliver = deliver
        self.tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drop-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.ring.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ring.wait(self.tick)
            if self._stop.is_set():
                return
            try:
                self.deliver(self.ring.read())
            except Exception:  # a bug in one batch must not end the daemon's events for good
                logging.getLogger("ksbpf.events").exception("drop events: a batch failed")


_ETH_NOT_IP = b"\0" * 12 + b"\x88\xb5"  # an Ethernet header the test run parses no IP header behind


def flush_held(instance_dir: Path) -> int:
    """The end of a flood: drops the kernel's rate limit held back, in keys whose window is
    over and which no later drop carried, are reported now (by the newest generation's
    ks_events_flush, which takes them atomically). Returns the events it made."""
    rate = instance_dir / EVENTS_RATE_PIN
    gens = sorted((g for g in instance_dir.glob("g*") if (g / EVENTS_FLUSH_PIN).exists()),
                  key=lambda g: int(g.name[1:]) if g.name[1:].isdigit() else -1)
    if not gens or not rate.exists():
        return 0
    now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    with BpfMap.pinned(rate) as m:
        due = [k for k, v in m.items() if (w := struct.unpack_from("<QQ", v))[1] and now_ns - w[0] >= 1_000_000_000]
    if not due:
        return 0
    fd = obj_get(gens[-1] / EVENTS_FLUSH_PIN)
    try:
        return sum(prog_test_run(fd, _ETH_NOT_IP + k, "running ks_events_flush") for k in due)
    finally:
        os.close(fd)


class CgroupPaths:
    """cgroup id -> path below the cgroup2 mount, for events: a cache, refilled by a walk
    of the tree (at most once per `refresh_s`) when an id is not in it."""

    def __init__(self, refresh_s: float = 1.0, max_ids: int = 65536) -> None:
        self.refresh_s = refresh_s
        self.max_ids = max_ids
        self._paths: dict[int, str] = {}
        self._walked = float("-inf")

    def __call__(self, cg_id: int) -> str | None:
        path = self._paths.get(cg_id)
        if path is not None or cg_id == 0:
            return path
        now = time.monotonic()
        if now - self._walked < self.refresh_s:
            return None
        self._walked = now
        try:
            found = {i: rel for rel, i in ids_by_path(cgroup2_mount()).items()}
        except (OSError, KsbpfError):
            return None
        self._paths = found if len(found) <= self.max_ids else {cg_id: found[cg_id]} if cg_id in found else {}
        return self._paths.get(cg_id)


class DropEventPump:
    """ksbpfd's consumer of drop events: reads the ring buffer on its own thread, names
    each event's cgroup, hands it to the watch sessions (WatchHub), keeps the last few for
    `ksctl status`, and writes the journal's coalesced lines (one per process, destination,
    reason and layer per `interval`, with KSBPF_* fields)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, recent: int = 10,
                 hub: WatchHub | None = None) -> None:
        self.log = logger
        self.hub = hub or WatchHub()
        self.coalescer = Coalescer(interval)
        self.names = CgroupPaths()
        self._recent: deque[DropEvent] = deque(maxlen=recent)
        self._lock = threading.Lock()
        self._reader: EventReader | None = None
        self._map_id: int | None = None
        self._dir: Path | None = None
        self._flushed_at = 0.0
        self.bad_records = 0

    def ensure(self, instance_dir: Path) -> str:
        """Read the instance's ring buffer (again, when the pinned map changed: a `down` and
        a new load make another). Returns "" or why events cannot be read."""
        ring = instance_dir / EVENTS_PIN
        try:
            fd = obj_get(ring)
        except OSError as e:
            return f"no event ring buffer at {ring} ({os_reason(e)})"
        try:
            map_id = map_info(fd).id
        except OSError as e:
            return os_reason(e)
        finally:
            os.close(fd)
        if self._reader is not None and map_id == self._map_id:
            return ""
        self.stop_reader()
        try:
            reader = EventReader(ring, self._deliver)
        except BpfError as e:
            return str(e)
        self._reader, self._map_id, self._dir = reader, map_id, instance_dir
        reader.start()
        return ""

    def stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.stop()
            self._reader, self._map_id = None, None

    def stop(self) -> None:
        """The daemon stops: watch sessions end, what the journal has not had yet is written."""
        self.stop_reader()
        self.hub.close()
        self._flush()

    @property
    def reading(self) -> bool:
        return self._reader is not None

    def recent(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e.as_dict() for e in self._recent]

    def _deliver(self, records: list[bytes]) -> None:
        events = []
        for raw in records:
            try:
                events.append(parse_record(raw))
            except BadRecord:
                self.bad_records += 1
        now = time.monotonic()
        if events:
            events = named(events, self.names)
            self.hub.publish(events)
            with self._lock:
                self._recent.extend(events)
            for e in events:
                self.coalescer.add(e, now)
        if self._dir is not None and now - self._flushed_at >= 1.0:
            self._flushed_at = now
            try:
                flush_held(self._dir)  # its events come in the next batch
            except OSError as e:
                self.log.debug("drop events: flushing held-back drops: %s", e)
        if self.coalescer.due(now):
            self._flush()

    def _flush(self) -> None:
        lines, folded = self.coalescer.flush()
        for c in lines:
            self.log.warning("%s", journal_message(c, self.coalescer.interval), extra=journal_fields(c))
        if folded:
            self.log.warning("dropped %d more packets of other processes, destinations or reasons (not itemized: "
                             "more than %d kinds within %.0f s)", folded, self.coalescer.max_keys,
                             self.coalescer.interval, extra={"KSBPF_EVENT": "drop", "KSBPF_COUNT": str(folded)})
