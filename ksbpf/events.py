"""Drop events: who tried to send where, and what became of it. Pure (no kernel access):
the record layout of bpf/killswitch.h's struct ks_event, the journal's coalescer, and the
hub that hands events to `ksctl watch` sessions. ksbpf.linux.events reads the ring buffer.
"""

from __future__ import annotations

import ipaddress
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

EVENT_FMT = "<QQII16sBBBBHH16s"  # struct ks_event
EVENT_SIZE = struct.calcsize(EVENT_FMT)
LAYERS = {1: "bpf", 2: "nftables"}
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


class BadRecord(ValueError):
    pass


@dataclass(frozen=True)
class DropEvent:
    """One event: `count` drops of packets like this one (the first and those the kernel's
    rate limit held back since the last event of its cgroup and reason)."""

    time: float  # Unix time of the drop that made the event
    pid: int  # the socket's creator (its thread group); 0: no owner record
    comm: str  # its command name when it made the socket
    cgroup_id: int
    cgroup: str  # path below the cgroup2 mount ("" the root); "#<id>" when not found
    family: str  # "ipv4", "ipv6" or ""
    proto: str
    daddr: str
    dport: int
    reason: str
    layer: str
    count: int

    @property
    def dest(self) -> str:
        if not self.daddr:
            return "?"
        host = f"[{self.daddr}]" if self.family == "ipv6" else self.daddr
        return f"{host}:{self.dport}" if self.dport else host

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = iso_time(self.time)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DropEvent:
        fields = dict(d)
        fields["time"] = datetime.fromisoformat(str(d["time"]).replace("Z", "+00:00")).timestamp()
        return cls(**{k: fields[k] for k in cls.__dataclass_fields__})

    def line(self) -> str:
        """One human line."""
        who = f"{self.comm or '?'}[{self.pid}]" if self.pid else "(no process)"
        cg = self.cgroup if self.cgroup else "/"
        times = f" x{self.count}" if self.count != 1 else ""
        return (f"{iso_time(self.time)} {self.layer} dropped {self.proto or '?'} to {self.dest} "
                f"({self.reason}){times} from {who} in {cg}")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_record(raw: bytes, monotonic_now: float | None = None, wall_now: float | None = None) -> DropEvent:
    """A ring buffer record -> DropEvent (cgroup as "#id" until the caller names it). The
    kernel stamps CLOCK_MONOTONIC; the event's Unix time is derived from the clocks now."""
    # Here, not at import: ksctl's status and watch print events without the policy parser.
    from ksbpf.verdict import DROP_REASONS

    if len(raw) < EVENT_SIZE:
        raise BadRecord(f"drop event of {len(raw)} bytes, expected {EVENT_SIZE}")
    t_ns, cg, pid, count, comm, fam, proto, layer, reason, dport, _pad, daddr = struct.unpack_from(EVENT_FMT, raw)
    mono = time.clock_gettime(time.CLOCK_MONOTONIC) if monotonic_now is None else monotonic_now
    wall = time.time() if wall_now is None else wall_now
    if fam == 4:
        family, addr = "ipv4", str(ipaddress.IPv4Address(daddr[:4]))
    elif fam == 6:
        family, addr = "ipv6", str(ipaddress.IPv6Address(daddr))
    else:
        family, addr = "", ""
    return DropEvent(
        time=wall - max(0.0, mono - t_ns / 1e9),
        pid=pid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
        cgroup_id=cg,
        cgroup=f"#{cg}",
        family=family,
        proto=PROTOS.get(proto, str(proto)) if fam else "",
        daddr=addr,
        dport=int.from_bytes(struct.pack("<H", dport), "big"),  # the kernel's network order
        reason=DROP_REASONS[reason].value if reason < len(DROP_REASONS) else f"reason_{reason}",
        layer=LAYERS.get(layer, f"layer_{layer}"),
        count=count,
    )


# ---------------------------------------------------------------- the journal's coalescer


CoalesceKey = tuple[int, str, str, str, str, str, int, str, str]


@dataclass
class Coalesced:
    first: DropEvent
    count: int
    events: int


class Coalescer:
    """One journal line per (process, cgroup, destination, reason, layer) per interval,
    with the number of packets: a chatty program cannot flood the journal. At most
    `max_keys` lines per interval; the rest are summed into one more (`folded`)."""

    def __init__(self, interval: float = 10.0, max_keys: int = 256) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._open: dict[CoalesceKey, Coalesced] = {}
        self.folded = 0  # packets of keys past max_keys in this interval
        self._started: float | None = None

    @staticmethod
    def key(e: DropEvent) -> CoalesceKey:
        return (e.pid, e.comm, e.cgroup, e.family, e.proto, e.daddr, e.dport, e.reason, e.layer)

    def add(self, e: DropEvent, now: float) -> None:
        if self._started is None:
            self._started = now
        k = self.key(e)
        c = self._open.get(k)
        if c is not None:
            c.count += e.count
            c.events += 1
        elif len(self._open) < self.max_keys:
            self._open[k] = Coalesced(e, e.count, 1)
        else:
            self.folded += e.count

    def due(self, now: float) -> bool:
        return self._started is not None and now - self._started >= self.interval

    def flush(self) -> tuple[list[Coalesced], int]:
        """(lines, packets folded past max_keys), and a new interval."""
        out, folded = list(self._open.values()), self.folded
        self._open, self.folded, self._started = {}, 0, None
        return out, folded


def journal_fields(c: Coalesced) -> dict[str, str]:
    e = c.first
    return {
        "KSBPF_EVENT": "drop",
        "KSBPF_PID": str(e.pid),
        "KSBPF_COMM": e.comm,
        "KSBPF_CGROUP": e.cgroup,
        "KSBPF_DEST": e.dest,
        "KSBPF_PROTO": e.proto,
        "KSBPF_REASON": e.reason,
        "KSBPF_LAYER": e.layer,
        "KSBPF_COUNT": str(c.count),
    }


def journal_message(c: Coalesced, interval: float) -> str:
    e = c.first
    who = f"{e.comm or '?'}[{e.pid}]" if e.pid else "a socket with no owner record"
    return (f"dropped {c.count} {e.proto or ''} packet{'s' if c.count != 1 else ''} from {who} in "
            f"{e.cgroup or '/'} to {e.dest}: {e.reason} ({e.layer}; within {interval:.0f} s)").replace("  ", " ")


# ---------------------------------------------------------------- watch sessions


@dataclass(frozen=True)
class WatchFilter:
    cgroup: str | None = None  # this cgroup and below (normalized, "" the root)
    reason: str | None = None

    def admits(self, e: DropEvent) -> bool:
        if self.reason is not None and e.reason != self.reason:
            return False
        if self.cgroup:
            return e.cgroup == self.cgroup or e.cgroup.startswith(self.cgroup + "/")
        return True


class Subscriber:
    """One watch session's queue: bounded, and a watcher that falls behind loses events
    (counted in `dropped`, told to it with the next event it gets) rather than holding the
    daemon up."""

    def __init__(self, flt: WatchFilter, size: int) -> None:
        self.filter = flt
        self.queue: queue.Queue[DropEvent | None] = queue.Queue(maxsize=size)
        self.dropped = 0

    def offer(self, e: DropEvent) -> None:
        if not self.filter.admits(e):
            return
        try:
            self.queue.put_nowait(e)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        # Wakes the session; it ends when it gets None (the daemon stops).
        while True:
            try:
                self.queue.put_nowait(None)
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    pass


class Busy(Exception):
    pass


class WatchHub:
    """Hands each event to every watch session; at most `max_subscribers` at a time."""

    def __init__(self, max_subscribers: int = 8, queue_size: int = 1024) -> None:
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self._closed = False

    def subscribe(self, flt: WatchFilter) -> Subscriber:
        with self._lock:
            if self._closed:
                raise Busy("ksbpfd is stopping")
            if len(self._subs) >= self.max_subscribers:
                raise Busy(f"{self.max_subscribers} watch sessions already (the most ksbpfd serves at once)")
            s = Subscriber(flt, self.queue_size)
            self._subs.append(s)
            return s

    def unsubscribe(self, s: Subscriber) -> None:
        with self._lock:
            if s in self._subs:
                self._subs.remove(s)

    def publish(self, events: Iterable[DropEvent]) -> None:
        with self._lock:
            subs = list(self._subs)
        for e in events:
            for s in subs:
                s.offer(e)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subs, self._subs = self._subs, []
        for s in subs:
            s.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._subs)


def named(events: Iterable[DropEvent], name_of: Callable[[int], str | None]) -> list[DropEvent]:
    """Events with their cgroup path (name_of(id) -> path or None when gone)."""
    out = []
    for e in events:
        path = name_of(e.cgroup_id)
        out.append(e if path is None else replace(e, cgroup=path))
    return out
