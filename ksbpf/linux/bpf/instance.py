"""What one instance keeps across its generations, under /sys/fs/bpf/ksbpf/<instance>/:
the maps every generation shares (drop counters, owner records, the drop-event ring, its
rate limit and lost count), checked against this build's layouts before a load reuses
them, and the drop counters and lost-event count read from them."""

from __future__ import annotations

import struct
from pathlib import Path

from ksbpf.errors import BpfError
from ksbpf.linux.bpf.kernel import (
    MAP_LRU_HASH,
    MAP_PERCPU_ARRAY,
    MAP_PERCPU_HASH,
    MAP_RINGBUF,
    MAP_SK_STORAGE,
    BpfMap,
)
from ksbpf.linux.bpf.layout import (
    DROP_KEY_FMT,
    DROP_VAL_FMT,
    DROPS_PIN,
    EVENTS_LOST_PIN,
    EVENTS_PIN,
    EVENTS_RATE_KEYS,
    EVENTS_RATE_PIN,
    OWNER_FMT,
    OWNERS_PIN,
    RATE_FMT,
    RATE_KEY_FMT,
    REASON_NUMBERS,
    SK_NETNS_PIN,
)
from ksbpf.linux.libbpf import BPF_NOEXIST
from ksbpf.verdict import DROP_REASONS


def check_instance_maps(pin_dir: Path, events_bytes: int) -> bool:
    """A pinned map from an older, incompatible build would be reused blindly by BCC:
    unpin it. True when every instance map is pinned and fits (the live generation's
    programs use those very maps, so it may be reused)."""
    wanted = {
        DROPS_PIN: (MAP_PERCPU_HASH, struct.calcsize(DROP_KEY_FMT), struct.calcsize(DROP_VAL_FMT), None),
        OWNERS_PIN: (MAP_SK_STORAGE, 4, struct.calcsize(OWNER_FMT), None),
        EVENTS_PIN: (MAP_RINGBUF, 0, 0, events_bytes),
        EVENTS_LOST_PIN: (MAP_PERCPU_ARRAY, 4, 8, 1),
        EVENTS_RATE_PIN: (MAP_LRU_HASH, struct.calcsize(RATE_KEY_FMT), struct.calcsize(RATE_FMT), EVENTS_RATE_KEYS),
    }
    legacy = pin_dir / SK_NETNS_PIN  # replaced by the owner records, which carry the netns
    if legacy.exists():
        legacy.unlink()
    kept = True
    for name, (mtype, ks, vs, entries) in wanted.items():
        path = pin_dir / name
        if not path.exists():
            kept = False
            continue
        try:
            with BpfMap.pinned(path) as m:
                ok = (m.info.type, m.info.key_size, m.info.value_size) == (mtype, ks, vs)
                ok = ok and entries in (None, m.info.max_entries)
        except OSError:
            ok = False
        if not ok:
            path.unlink()
            kept = False
    return kept


def zero_counters(pin_dir: Path) -> None:
    """Create each reason's entry under cgroup id 0, where ks_egress counts drops once the
    map is full (a program cannot insert into a full map); counts already there stay."""
    with BpfMap.pinned(pin_dir / DROPS_PIN) as m:
        zero = struct.pack(DROP_VAL_FMT, 0, 0)
        for r in DROP_REASONS:
            try:
                m.update(struct.pack(DROP_KEY_FMT, REASON_NUMBERS[r], 0, 0), zero, BPF_NOEXIST)
            except FileExistsError:
                pass


def read_counters(pin_dir: Path) -> list[tuple[str, int, int, int]]:
    """(reason, cgroup id, packets, bytes) from the pinned drop counters, summed over
    CPUs; cgroup id 0 collects drops after the map filled up."""
    path = pin_dir / DROPS_PIN
    if not path.exists():
        return []
    out: list[tuple[str, int, int, int]] = []
    try:
        with BpfMap.pinned(path) as m:
            for k, raw in m.items():
                reason, _, cg = struct.unpack(DROP_KEY_FMT, k)
                pk = by = 0
                for v in m.percpu_values(raw):
                    p, b = struct.unpack(DROP_VAL_FMT, v)
                    pk += p
                    by += b
                name = DROP_REASONS[reason].value if reason < len(DROP_REASONS) else f"reason_{reason}"
                if pk or cg:
                    out.append((name, cg, pk, by))
    except OSError as e:
        raise BpfError(f"reading {path}: {e}") from None
    return sorted(out)


def read_events_lost(pin_dir: Path) -> int:
    """Drop events the ring buffer had no room for (their packets ride on the next
    event of their key), summed over CPUs; 0 before the first load."""
    path = pin_dir / EVENTS_LOST_PIN
    if not path.exists():
        return 0
    try:
        with BpfMap.pinned(path) as m:
            raw = m.lookup(struct.pack("<I", 0))
            return sum(struct.unpack("<Q", v)[0] for v in m.percpu_values(raw)) if raw else 0
    except OSError as e:
        raise BpfError(f"reading {path}: {e}") from None
