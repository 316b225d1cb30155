"""The consumer side of the drop-event ring buffer (BPF_MAP_TYPE_RINGBUF), in Python with
mmap: ksbpfd reads events without BCC or libbpf.

Layout (kernel/bpf/ringbuf.c): page 0 of the map's mmap is the consumer position (ours to
write); from page 1 on, read-only, the producer position, then the data pages, mapped twice
in a row so that a record never wraps. A record is an 8-byte header (u32 length with the
BUSY and DISCARD bits, u32 page offset) and its data, padded to 8 bytes. The map's fd polls
readable when records are there.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from ksbpf.errors import BpfError
from ksbpf.linux.bpf import MAP_RINGBUF, map_info, obj_get, os_reason

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
            self.deliver(self.ring.read())
