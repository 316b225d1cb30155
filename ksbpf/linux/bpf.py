"""The cgroup-bpf layer: BCC compiles `bpf/killswitch.c`, this module loads, fills,
attaches, replaces and reads it.

Two programs per generation, attached with BPF_F_ALLOW_MULTI to the policy's [bpf] cgroup:
`ks_egress` (cgroup_skb/egress) drops what would leave outside the tunnel and counts it,
`ks_sock_create` (cgroup/sock_create) gives sockets of exempt cgroups their exempt mark
and those of endpoint cgroups the endpoint mark (ksbpf.marks), so routing and nftables
can tell them apart, and records who made each socket. Two more report drops (drop
events, read by ksbpf.linux.events): `ks_kfree_skb` (tp_btf/kfree_skb, attached through a
pinned bpf_link) reports nftables' drops, and `ks_events_flush` (never attached; ksbpfd
runs it) reports what the events' rate limit held back at the end of a flood.

Design, in short (the why of each is next to the code that does it):

- Compiling happens in a short-lived child process (`python -m ksbpf.linux.bpf`): BCC and
  LLVM cost ~100 MiB of RSS that a long-running daemon should not carry. The child only
  compiles, loads and pins; filling maps and attaching happen here, through bpf(2) via
  ctypes, so this module never imports bcc.
- Pins, per instance, under /sys/fs/bpf/ksbpf/<instance>/:
      drops        per-CPU hash (reason, cgroup id) -> (packets, bytes), shared by all
                   generations so counters survive reloads and restarts
      owners       socket storage: who made each socket (pid, comm, cgroup) and its netns
                   cookie (the netns check on kernels without the cgroup_skb helper)
      events       the drop-event ring buffer ksbpfd reads (ksbpf.linux.events), with
      events_rate  its per-(cgroup, reason, layer) rate limit and
      events_lost  the count of events it had no room for
      g<N>/        one generation: egress, sock_create and its own policy maps, and
                   nft_events, the bpf_link of its kfree_skb program (nftables' drops)
  A generation is one build of the programs. Its maps are filled before it is attached,
  so a program never sees a half-written policy.
- A new policy whose programs would be built exactly as the live generation's (same source,
  cflags, header tree, netns mode; see build_digest) and attach to the same cgroup updates
  the live generation's maps in place, with no compile: the maps hold two policy versions
  (struct ks_config in bpf/killswitch.h), the new one is written beside the live one,
  sharing what did not change, and one u32 flips packets over to it, so a packet is judged
  by one version whole. The old version's entries go after an RCU grace period, when no
  packet can still be reading them. The same policy again writes nothing.
- Capacity: a policy the maps cannot hold is refused before anything is touched
  (check_capacity). Hash maps allocate their buckets up front even without preallocated
  elements, so the endpoint map is sized from the policy in powers of two (Capacity); a
  policy outgrowing its generation's size is built anew, one that shrinks keeps it.
- Replacement: BPF_PROG_ATTACH with BPF_F_REPLACE swaps the old generation's program for
  the new one in place (atomic: never zero, never two). When that is impossible (the
  attach cgroup changed) the new one is attached first and the old one detached after
  (make-before-break; both run meanwhile and any drop wins, so nothing leaks).
- Legacy attachments (not bpf_links) on purpose: they stay until detached, so a loader
  that exits or crashes, or someone deleting the pins, leaves enforcement in place.
- Network namespaces: a program on a cgroup sees that cgroup's sockets in every netns,
  and ifindexes are per netns. The program judges only packets of its target netns
  (netns cookie, from bpf_get_netns_cookie(skb) where cgroup_skb has it, else recorded
  per socket at creation) and passes the others, which are another instance's business.
  In the per-socket mode a socket created before the first attach has no record and is
  judged as the target netns's (fail closed).

Limits worth knowing: marks are given at socket creation, so an exempt service's sockets
opened before the first engage carry no exempt mark (nftables and routing match the mark;
this layer matches the cgroup); counters count skbs (a GSO skb once); an exemption on a
cgroup deeper than MAX_CGROUP_DEPTH is not seen (fail closed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import importlib.resources
import ipaddress
import json
import os
import re
import resource
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import ksbpf
from ksbpf import marks
from ksbpf.errors import BpfError, CapacityError, KsbpfError
from ksbpf.linux import bpffs, btf, headers
from ksbpf.linux.cgroup import cgroup2_mount, cgroup_dir, cgroup_id, ids_by_path
from ksbpf.linux.netns import netns
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids
from ksbpf.policy import Exemption, IPNetwork, Policy, PortSpec, normalize_cgroup
from ksbpf.verdict import DROP_REASONS, Reason, interface_matches

BPFFS = bpffs.BPFFS
PIN_ROOT = BPFFS / "ksbpf"
SOURCE = "killswitch.c"

PROGS = {"egress": "ks_egress", "sock_create": "ks_sock_create"}
GEN_MAPS = ("ks_active", "ks_config", "ks_tunnels", "ks_tunnels_big", "ks_endpoints", "ks_dns", "ks_cgroups",
            "ks_ports", "ks_nets")
DROPS_PIN = "drops"
SK_NETNS_PIN = "sk_netns"  # before owner records: unpinned when found
OWNERS_PIN = "owners"
EVENTS_PIN = "events"
EVENTS_LOST_PIN = "events_lost"
EVENTS_RATE_PIN = "events_rate"
NFT_EVENTS_LINK = "nft_events"  # in a generation's directory: the kfree_skb program's bpf_link
NFT_EVENTS_PROG = "ks_kfree_skb"
EVENTS_FLUSH_PIN = "events_flush"  # in a generation's directory: run by ksbpfd, never attached
EVENTS_FLUSH_PROG = "ks_events_flush"
RATE_KEY_FMT = "<QII"  # struct ks_rate_key
RATE_FMT = "<QQII16sBBHI16s"  # struct ks_rate

# Drop events (ksbpf.linux.events reads them).
EVENTS_BYTES = 256 * 1024  # ~4000 events: one second of every key's allowance on a busy host
EVENTS_PER_SEC = 8  # per (cgroup, reason, layer); the rest ride on the next event's count
EVENTS_RATE_KEYS = 4096
OWNER_FMT = "<QQII16s"
EVENT_FMT = "<QQII16sBBBBHH16s"

MAX_CGROUP_DEPTH = 31
MAX_DROP_KEYS = 4096

# What one policy may hold (check_capacity). Maps of policy are twice this: during an
# update they hold the live version and the next one.
MAX_ENDPOINTS = 65536
MIN_ENDPOINT_TIER = 1024
MAX_DNS = 256
MAX_CGROUPS = 32768  # exempt and endpoint cgroups
MAX_RULES = 131072  # LPM keys of exemptions (and LAN), each of ks_ports and ks_nets
TUNNEL_INDEX = 4096  # ifindexes below it are looked up in an array (inlined), the rest hashed
MAX_BIG_TUNNELS = 1024

# Map layouts of bpf/killswitch.h.
CONFIG_FMT = "<QQQIIIIIIIIB7x4Q32s64s"
LEGACY_CONFIG_FMT = "<QQQII64s"  # before policy versions
CGROUP_KEY_FMT = "<QII"
CGROUP_FMT = "<IIII"
TUNNEL_KEY_FMT = "<II"
DROP_KEY_FMT = "<IIQ"
DROP_VAL_FMT = "<QQ"
F_IPV6_BLOCK, F_ENDPOINT_MARK, F_ENDPOINT_CGROUPS = 0x1, 0x2, 0x4
KIND_ALLOW, KIND_LISTEN = 0, 1
PORT_PREFIX_BASE = NET_PREFIX_BASE = 40
IPPROTO = {"tcp": 6, "udp": 17}

REASON_NUMBERS: dict[Reason, int] = {r: i for i, r in enumerate(DROP_REASONS)}

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def instance_name(netns_name: str | None) -> str:
    """The instance a ksbpf engine uses for a netns: one per netns, so concurrent engines
    (the host's, a lab's, a test's) keep apart pins and programs."""
    return "host" if netns_name is None else f"netns-{netns_name}"


# =========================================================================== bpf(2)

_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_GET_NEXT_KEY = 4
_BPF_PROG_LOAD = 5
_BPF_OBJ_PIN = 6
_BPF_OBJ_GET = 7
_BPF_PROG_ATTACH = 8
_BPF_PROG_DETACH = 9
_BPF_PROG_GET_NEXT_ID = 11
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_MAP_GET_FD_BY_ID = 14
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_PROG_QUERY = 16
_BPF_RAW_TRACEPOINT_OPEN = 17
_BPF_MAP_LOOKUP_BATCH = 24
_BPF_MAP_UPDATE_BATCH = 26
_BPF_MAP_DELETE_BATCH = 27

BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4
BPF_ANY, BPF_NOEXIST = 0, 1

ATTACH_EGRESS = 1  # BPF_CGROUP_INET_EGRESS
ATTACH_SOCK_CREATE = 2  # BPF_CGROUP_INET_SOCK_CREATE
ATTACH_TYPES = {"egress": ATTACH_EGRESS, "sock_create": ATTACH_SOCK_CREATE}

MAP_PERCPU_HASH = 5
MAP_PERCPU_ARRAY = 6
MAP_LRU_HASH = 9
MAP_SK_STORAGE = 24
MAP_RINGBUF = 27
PROG_CGROUP_SKB = 8
PROG_TRACING = 26
ATTACH_TRACE_RAW_TP = 23  # BPF_TRACE_RAW_TP: tp_btf

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "armv7l": 389, "ppc64le": 365, "s390x": 356, "riscv64": 283}
_MEMBARRIER_CMD_GLOBAL = 1
# A batch command the map type does not have: EINVAL, EOPNOTSUPP, or the kernel's ENOTSUPP.
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)
_SO_NETNS_COOKIE = 71
_BPF_FUNC_GET_NETNS_COOKIE = 122

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {os.uname().machine}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(128)


def rcu_grace_period() -> None:
    """Wait until every BPF program run that started before now has ended: programs run
    under rcu_read_lock, and membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu().
    Where it is missing (nohz_full, unknown arch) a pause stands in; a run takes microseconds."""
    nr = _NR_MEMBARRIER.get(os.uname().machine)
    if nr is not None and _libc.syscall(ctypes.c_long(nr), ctypes.c_int(_MEMBARRIER_CMD_GLOBAL),
                                        ctypes.c_uint(0), ctypes.c_int(0)) == 0:
        return
    time.sleep(0.05)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: Path | str) -> int:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    a = _attr()
    struct.pack_into("<Q", a, 0, _addr(name))
    return _sys_bpf(_BPF_OBJ_GET, a, f"open pinned {path}")


def obj_pin(fd: int, path: Path | str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    a = _attr()
    struct.pack_into("<QI", a, 0, _addr(name), fd)
    _sys_bpf(_BPF_OBJ_PIN, a, f"pin {path}")


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int, replace_fd: int | None = None) -> None:
    a = _attr()
    flags = BPF_F_ALLOW_MULTI | (BPF_F_REPLACE if replace_fd is not None else 0)
    struct.pack_into("<IIIII", a, 0, cgroup_fd, prog_fd, attach_type, flags, replace_fd or 0)
    _sys_bpf(_BPF_PROG_ATTACH, a, "attach")


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    a = _attr()
    struct.pack_into("<III", a, 0, cgroup_fd, prog_fd, attach_type)
    _sys_bpf(_BPF_PROG_DETACH, a, "detach")


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup (not inherited ones)."""
    cap = 64
    while True:
        ids = (ctypes.c_uint32 * cap)()
        a = _attr()
        struct.pack_into("<IIIIQI", a, 0, cgroup_fd, attach_type, 0, 0, ctypes.addressof(ids), cap)
        try:
            _sys_bpf(_BPF_PROG_QUERY, a, "query cgroup programs")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                cap *= 4
                continue
            raise
        count = struct.unpack_from("<I", a, 24)[0]
        return list(ids[:count])


EPERM_HINT = ("ksbpf needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN, and a container must allow the bpf "
              "system call (systemd-nspawn: --system-call-filter=bpf --capability=all; docker: --privileged or a "
              "seccomp profile allowing bpf, with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN)")


def os_reason(e: OSError) -> str:
    """An OSError as a layer's reason: what failed and why, with the fix for EPERM."""
    what = f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    if e.errno == errno.EPERM:
        what += f" ({EPERM_HINT})"
    return what


def prog_ids() -> Iterator[int]:
    """Ids of every BPF program loaded in the kernel (BPF_PROG_GET_NEXT_ID)."""
    cur = 0
    while True:
        a = _attr()
        struct.pack_into("<I", a, 0, cur)
        try:
            _sys_bpf(_BPF_PROG_GET_NEXT_ID, a, "list programs")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        cur = struct.unpack_from("<I", a, 4)[0]
        yield cur


def _fd_by_id(cmd: int, obj_id: int, what: str) -> int:
    a = _attr()
    struct.pack_into("<I", a, 0, obj_id)
    return _sys_bpf(cmd, a, what)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    map_ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(88)
    struct.pack_into("<IQ", info, 52, 64, ctypes.addressof(map_ids))
    a = _attr()
    struct.pack_into("<IIQ", a, 0, fd, len(info), ctypes.addressof(info))
    _sys_bpf(_BPF_OBJ_GET_INFO_BY_FD, a, "program info")
    ptype, pid = struct.unpack_from("<II", info, 0)
    nr = struct.unpack_from("<I", info, 52)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(pid, ptype, name, tuple(map_ids[: min(nr, 64)]))


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(40)
    a = _attr()
    struct.pack_into("<IIQ", a, 0, fd, len(info), ctypes.addressof(info))
    _sys_bpf(_BPF_OBJ_GET_INFO_BY_FD, a, "map info")
    mtype, mid, ks, vs, me, fl = struct.unpack_from("<IIIIII", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(mid, mtype, ks, vs, me, fl, name)


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class BpfMap:
    """A map opened by fd (pinned path or id), read and written with bpf(2)."""

    # Elements written (updated or deleted) per map name, by every BpfMap of this process:
    # how tests and benchmarks see that an update is O(changed) without timing it.
    written: ClassVar[Counter[str]] = Counter()
    # Whole-map reads (keys() or items()) and single-key lookups, per map name, likewise.
    read_whole: ClassVar[Counter[str]] = Counter()
    looked_up: ClassVar[Counter[str]] = Counter()

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.info = map_info(fd)
        self.percpu = self.info.type in (5, 6, 10)  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
        self.ncpus = _possible_cpus() if self.percpu else 1
        self.value_stride = (self.info.value_size + 7) // 8 * 8 if self.percpu else self.info.value_size

    @classmethod
    def pinned(cls, path: Path | str) -> BpfMap:
        return cls(obj_get(path))

    @classmethod
    def by_id(cls, map_id: int) -> BpfMap:
        return cls(_fd_by_id(_BPF_MAP_GET_FD_BY_ID, map_id, f"open map id {map_id}"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.info.key_size:
            raise ValueError(f"map {self.info.name}: key of {len(key)} bytes, map wants {self.info.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> bytes | None:
        """The value; for per-CPU maps, every CPU's value back to back."""
        BpfMap.looked_up[self.info.name] += 1
        return self._lookup(key)

    def _lookup(self, key: bytes) -> bytes | None:
        k = self._key(key)
        v = ctypes.create_string_buffer(self.value_stride * self.ncpus)
        a = _attr()
        struct.pack_into("<IIQQ", a, 0, self.fd, 0, ctypes.addressof(k), ctypes.addressof(v))
        try:
            _sys_bpf(_BPF_MAP_LOOKUP_ELEM, a, f"lookup in {self.info.name}")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        BpfMap.written[self.info.name] += 1
        self._update(key, value, flags)

    def _update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        k = self._key(key)
        if self.percpu and len(value) == self.info.value_size:
            value = value.ljust(self.value_stride, b"\0") * self.ncpus
        v = ctypes.create_string_buffer(value, len(value))
        a = _attr()
        struct.pack_into("<IIQQQ", a, 0, self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), flags)
        _sys_bpf(_BPF_MAP_UPDATE_ELEM, a, f"update {self.info.name}")

    def delete(self, key: bytes) -> bool:
        BpfMap.written[self.info.name] += 1
        return self._delete(key)

    def _delete(self, key: bytes) -> bool:
        k = self._key(key)
        a = _attr()
        struct.pack_into("<IIQ", a, 0, self.fd, 0, ctypes.addressof(k))
        try:
            _sys_bpf(_BPF_MAP_DELETE_ELEM, a, f"delete from {self.info.name}")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def _keys_one_by_one(self) -> list[bytes]:
        out: list[bytes] = []
        prev: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.info.key_size)
        while True:
            a = _attr()
            struct.pack_into("<IIQQ", a, 0, self.fd, 0, _addr(prev), ctypes.addressof(nxt))
            try:
                _sys_bpf(_BPF_MAP_GET_NEXT_KEY, a, f"iterate {self.info.name}")
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.raw)
            prev = ctypes.create_string_buffer(nxt.raw, self.info.key_size)

    def _batch_attr(self, keys: ctypes.Array[ctypes.c_char], values: ctypes.Array[ctypes.c_char] | None,
                    count: int, in_batch: ctypes.Array[ctypes.c_char] | None = None,
                    out_batch: ctypes.Array[ctypes.c_char] | None = None) -> ctypes.Array[ctypes.c_char]:
        a = _attr()
        struct.pack_into("<QQQQII", a, 0, _addr(in_batch), _addr(out_batch), ctypes.addressof(keys),
                         _addr(values), count, self.fd)
        return a

    def _items_batched(self) -> list[tuple[bytes, bytes]] | None:
        """Every entry with BPF_MAP_LOOKUP_BATCH (a syscall per thousands of entries), or
        None where the kernel has no batch lookup for this map type."""
        ks, vs = self.info.key_size, self.info.value_size
        chunk = max(64, min(self.info.max_entries, 8192))
        # The resume token is a bucket number for hash maps, a key for the others.
        tokens = [ctypes.create_string_buffer(max(ks, 8)) for _ in range(2)]
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            keys = ctypes.create_string_buffer(ks * chunk)
            values = ctypes.create_string_buffer(vs * chunk)
            a = self._batch_attr(keys, values, chunk, None if first else tokens[0], tokens[1])
            done = False
            try:
                _sys_bpf(_BPF_MAP_LOOKUP_BATCH, a, f"read {self.info.name}")
            except OSError as e:
                if e.errno == errno.ENOENT:
                    done = True
                elif e.errno == errno.ENOSPC:  # one hash bucket holds more than `chunk`
                    chunk *= 4
                    continue
                elif first and e.errno in _NO_BATCH:
                    return None
                else:
                    raise
            n = struct.unpack_from("<I", a, 32)[0]
            kr, vr = keys.raw, values.raw
            out.extend((kr[i * ks:(i + 1) * ks], vr[i * vs:(i + 1) * vs]) for i in range(n))
            if done:
                return out
            ctypes.memmove(tokens[0], tokens[1], len(tokens[1]))
            first = False

    def keys(self) -> list[bytes]:
        BpfMap.read_whole[self.info.name] += 1
        if not self.percpu:
            batched = self._items_batched()
            if batched is not None:
                return [k for k, _ in batched]
        return self._keys_one_by_one()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        BpfMap.read_whole[self.info.name] += 1
        if not self.percpu:
            batched = self._items_batched()
            if batched is not None:
                yield from batched
                return
        for k in self._keys_one_by_one():
            v = self._lookup(k)
            if v is not None:
                yield k, v

    def percpu_values(self, raw: bytes) -> list[bytes]:
        return [raw[i * self.value_stride : i * self.value_stride + self.info.value_size] for i in range(self.ncpus)]

    def update_many(self, entries: Mapping[bytes, bytes]) -> None:
        """Write entries, thousands per syscall where the kernel batches for this map type."""
        if not entries:
            return
        BpfMap.written[self.info.name] += len(entries)
        ks, vs = self.info.key_size, self.info.value_size
        if not self.percpu:
            items = list(entries.items())
            for k, v in items:
                if len(k) != ks or len(v) != vs:
                    raise ValueError(f"map {self.info.name}: entry of {len(k)}+{len(v)} bytes, map wants {ks}+{vs}")
            done = 0
            while done < len(items):
                part = items[done:done + 8192]
                keys = ctypes.create_string_buffer(b"".join(k for k, _ in part), ks * len(part))
                values = ctypes.create_string_buffer(b"".join(v for _, v in part), vs * len(part))
                a = self._batch_attr(keys, values, len(part))
                try:
                    _sys_bpf(_BPF_MAP_UPDATE_BATCH, a, f"update {self.info.name}")
                except OSError as e:
                    if done == 0 and e.errno in _NO_BATCH and struct.unpack_from("<I", a, 32)[0] == 0:
                        break
                    raise
                done += len(part)
            else:
                return
        for k, v in entries.items():
            self._update(k, v)

    def delete_many(self, keys: Iterable[bytes]) -> None:
        """Delete keys that are there (a batch stops at the first missing one)."""
        todo = list(keys)
        if not todo:
            return
        BpfMap.written[self.info.name] += len(todo)
        ks = self.info.key_size
        while todo:
            part = todo[:8192]
            buf = ctypes.create_string_buffer(b"".join(part), ks * len(part))
            a = self._batch_attr(buf, None, len(part))
            try:
                _sys_bpf(_BPF_MAP_DELETE_BATCH, a, f"delete from {self.info.name}")
            except OSError as e:
                n = struct.unpack_from("<I", a, 32)[0]
                if e.errno == errno.ENOENT:  # skip the missing key and go on
                    todo = todo[n + 1:]
                    continue
                if e.errno in _NO_BATCH:
                    for k in todo[n:]:
                        self._delete(k)
                    return
                raise
            todo = todo[len(part):]


def probe_netns_cookie_helper() -> bool:
    """Does this kernel let cgroup_skb programs call bpf_get_netns_cookie (6.15+)?
    Asks the verifier with a three-instruction program; needs no compiler."""
    insns = b"".join(
        struct.pack("<BBhi", code, regs, 0, imm)
        for code, regs, imm in (
            (0x85, 0x00, _BPF_FUNC_GET_NETNS_COOKIE),  # call bpf_get_netns_cookie(ctx)
            (0xB7, 0x00, 1),  # r0 = 1
            (0x95, 0x00, 0),  # exit
        )
    )
    prog = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    a = _attr()
    struct.pack_into("<IIQQ", a, 0, PROG_CGROUP_SKB, 3, ctypes.addressof(prog), ctypes.addressof(lic))
    struct.pack_into("<I", a, 68, ATTACH_EGRESS)
    try:
        fd = _sys_bpf(_BPF_PROG_LOAD, a, "probe")
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EACCES):
            return False
        raise
    os.close(fd)
    return True


_PROG_CGROUP_SOCK = 9


@functools.lru_cache(maxsize=1)
def probe_sock_task_helpers() -> bool:
    """May cgroup/sock_create programs ask who "current" is (bpf_get_current_pid_tgid and
    bpf_get_current_comm, 6.1+)? Without them sockets' owner records carry no process."""
    insns = b"".join(
        struct.pack("<BBhi", code, regs, off, imm)
        for code, regs, off, imm in (
            (0xBF, 0x16, 0, 0),  # r6 = r1
            (0x85, 0x00, 0, 14),  # call bpf_get_current_pid_tgid
            (0xBF, 0xA1, 0, 0),  # r1 = r10
            (0x07, 0x01, 0, -16),  # r1 += -16
            (0xB7, 0x02, 0, 16),  # r2 = 16
            (0x85, 0x00, 0, 16),  # call bpf_get_current_comm(r1, r2)
            (0xB7, 0x00, 0, 1),  # r0 = 1
            (0x95, 0x00, 0, 0),  # exit
        )
    )
    prog = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    a = _attr()
    struct.pack_into("<IIQQ", a, 0, _PROG_CGROUP_SOCK, len(insns) // 8, ctypes.addressof(prog), ctypes.addressof(lic))
    struct.pack_into("<I", a, 68, ATTACH_SOCK_CREATE)
    try:
        fd = _sys_bpf(_BPF_PROG_LOAD, a, "probe")
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EACCES):
            return False
        raise
    os.close(fd)
    return True


def netns_cookie(name: str | None) -> int:
    """The cookie of a named netns (None: this thread's), as BPF's bpf_get_netns_cookie sees it."""
    with netns(name):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
    return int(struct.unpack("<Q", raw)[0])


# =========================================================================== rendering


@dataclass(frozen=True)
class ExemptionRules:
    cgroup: str
    mark: int
    allow: tuple[PortSpec, ...]
    listen: tuple[PortSpec, ...]
    to: tuple[IPNetwork, ...]  # both families, as Exemption.to_networks gives them
    from_: tuple[IPNetwork, ...]

    @cached_property
    def digest(self) -> int:
        """Of what rule_keys writes for it (ports and networks, not the cgroup or mark), as
        64 bits; the low 32 are kept in its ks_cgroups entry (CgroupEntry.digest)."""
        parts: list[bytes] = []
        for specs, networks in ((self.allow, self.to), (self.listen, self.from_)):
            parts.append(b"".join(struct.pack("<BHH", IPPROTO[s.proto], s.first, s.last) for s in specs))
            parts.append(b"".join(n.network_address.packed + bytes((n.prefixlen,)) for n in networks) if specs else b"")
        data = b"|".join(len(p).to_bytes(4, "little") + p for p in parts)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    @cached_property
    def want(self) -> CgroupWant:
        """What its cgroup is when it is no endpoint cgroup (kept, as the rules are kept)."""
        return CgroupWant(self, self.mark, False)

    @cached_property
    def counts(self) -> tuple[int, int]:
        """(ks_ports keys, ks_nets keys) rule_keys writes for it."""
        ports = nets = 0
        for specs, networks in ((self.allow, self.to), (self.listen, self.from_)):
            if specs:
                ports += sum(len(port_prefixes(s.first, s.last)) for s in specs)
                nets += len(networks)
        return ports, nets


@dataclass(frozen=True)
class BpfPlan:
    """What a policy means to the BPF maps, before cgroup paths become ids and before
    version tags and rule set ids are chosen. Pure."""

    flags: int
    endpoint_mark: int
    tunnel_patterns: tuple[str, ...]
    endpoints: tuple[bytes, ...]  # endpoint_key()s, untagged
    dns: tuple[bytes, ...]  # addr_key()s, untagged
    lan: tuple[IPNetwork, ...]
    exemptions: tuple[ExemptionRules, ...]
    endpoint_cgroups: tuple[str, ...]
    # the mark sock_create gives endpoint cgroups' sockets (0: the VPN client sets its own)
    endpoint_cgroup_mark: int


def _addr16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return addr.packed.ljust(16, b"\0")


def endpoint_key(family: int, proto: str, port: int, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct ks_endpoint_key without its leading tag (see tagged)."""
    return struct.pack("<BB", family, IPPROTO[proto]) + port.to_bytes(2, "big") + _addr16(addr)


def addr_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """struct ks_addr_key without its leading tag (see tagged)."""
    return struct.pack("<B3x", addr.version) + _addr16(addr)


def tagged(tag: int, key: bytes) -> bytes:
    """An endpoint or DNS key of the policy version with this tag."""
    return struct.pack("<I", tag) + key


def key_tag(key: bytes) -> int:
    return int(struct.unpack_from("<I", key)[0])


def cgroup_key(cgroup_id: int, tag: int) -> bytes:
    """struct ks_cgroup_key: a cgroup id in the policy version with this tag."""
    return struct.pack(CGROUP_KEY_FMT, cgroup_id, tag, 0)


def net_key(scope: int, net: IPNetwork) -> bytes:
    return struct.pack("<IIB", NET_PREFIX_BASE + net.prefixlen, scope, net.version) + _addr16(
        net.network_address
    ) + b"\0" * 3


def port_key(scope: int, proto: str, port: int, prefix: int) -> bytes:
    return struct.pack("<IIB", PORT_PREFIX_BASE + prefix, scope, IPPROTO[proto]) + port.to_bytes(2, "big") + b"\0"


def rule_set_of(lpm_key: bytes) -> int:
    """The rule set id of a ks_ports or ks_nets key."""
    return int(struct.unpack_from("<I", lpm_key, 4)[0]) >> 1


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """An inclusive port range as (port, prefix length) blocks for the LPM trie."""
    out: list[tuple[int, int]] = []
    while first <= last:
        size = first & -first if first else 1 << 16
        while size > last - first + 1:
            size >>= 1
        out.append((first, 17 - size.bit_length()))
        first += size
    return out


def scope(rules: int, kind: int) -> int:
    return (rules << 1) | kind


# Exemption -> its ExemptionRules, by identity, for the exemptions the last render saw:
# ksbpfd re-renders the same Exemption objects on every exempt (its policy snapshot and
# run-time store are cached), so only the new one is built and digested again.
_RENDERED: dict[int, tuple[Exemption, int, ExemptionRules]] = {}


def _render_exemptions(policy: Policy) -> tuple[ExemptionRules, ...]:
    global _RENDERED
    ids = exemption_ids([e.cgroup for e in policy.exemptions])
    memo: dict[int, tuple[Exemption, int, ExemptionRules]] = _RENDERED
    fresh: dict[int, tuple[Exemption, int, ExemptionRules]] = {}
    out: list[ExemptionRules] = []
    for e in policy.exemptions:
        mark = exempt_mark(ids[e.cgroup])
        rules = _rules_for(e, mark, memo)
        fresh[id(e)] = (e, mark, rules)
        out.append(rules)
    _RENDERED = fresh
    return tuple(out)


def _rules_for(e: Exemption, mark: int,
               memo: Mapping[int, tuple[Exemption, int, ExemptionRules]] | None = None) -> ExemptionRules:
    """One exemption's ExemptionRules with this mark (from the last render's, if it has them)."""
    hit = (_RENDERED if memo is None else memo).get(id(e))
    # The memo holds the Exemption itself, so its id cannot have been reused; it is frozen.
    if hit is not None and hit[0] is e and hit[1] == mark:
        return hit[2]
    return ExemptionRules(
        cgroup=e.cgroup,
        mark=mark,
        allow=e.allow,
        listen=e.listen,
        # Networks only where there are ports for them (rule_keys ignores the others).
        to=e.to_networks(4) + e.to_networks(6) if e.allow else (),
        from_=e.from_networks(4) + e.from_networks(6) if e.listen else (),
    )


def endpoint_cgroup_mark(policy: Policy) -> int:
    """The mark sock_create gives endpoint cgroups' sockets (0: the VPN client sets its own)."""
    t = policy.tunnel
    return DEFAULT_ENDPOINT_MARK if t.endpoint_cgroups and t.endpoint_mark is None else 0


def render(policy: Policy, sets: bool = True) -> BpfPlan:
    """`sets=False` leaves the endpoint and DNS key sets empty (update_exemptions takes
    only exemptions and endpoint cgroups from a policy; LAN still counts for capacity)."""
    t = policy.tunnel
    flags = 0
    if policy.ipv6.mode == "block":
        flags |= F_IPV6_BLOCK
    if t.endpoint_mark is not None:
        flags |= F_ENDPOINT_MARK
    if t.endpoint_cgroups:
        flags |= F_ENDPOINT_CGROUPS
    return BpfPlan(
        flags=flags,
        endpoint_mark=t.endpoint_mark or 0,
        tunnel_patterns=t.interfaces,
        endpoints=tuple(dict.fromkeys(endpoint_key(ep.family, ep.proto, ep.port, ep.address)
                                      for ep in t.endpoints)) if sets else (),
        dns=tuple(dict.fromkeys(addr_key(a) for a in policy.dns.servers)) if sets else (),
        lan=policy.lan_networks(4) + policy.lan_networks(6),
        exemptions=_render_exemptions(policy),
        endpoint_cgroups=t.endpoint_cgroups,
        endpoint_cgroup_mark=endpoint_cgroup_mark(policy),
    )


def rule_keys(rules: ExemptionRules, rule_set: int) -> tuple[list[bytes], list[bytes]]:
    """ks_ports and ks_nets keys of one exemption as rule set `rule_set`."""
    ports: list[bytes] = []
    nets: list[bytes] = []
    for kind, specs, networks in ((KIND_ALLOW, rules.allow, rules.to), (KIND_LISTEN, rules.listen, rules.from_)):
        if not specs:
            continue
        sc = scope(rule_set, kind)
        for spec in specs:
            ports.extend(port_key(sc, spec.proto, p, n) for p, n in port_prefixes(spec.first, spec.last))
        nets.extend(net_key(sc, n) for n in networks)
    return ports, nets


def lan_keys(networks: Iterable[IPNetwork], rule_set: int) -> list[bytes]:
    return [net_key(scope(rule_set, KIND_ALLOW), n) for n in networks]


def check_capacity(plan: BpfPlan) -> None:
    """Refuse a policy the maps cannot hold, naming the limit, before anything is touched."""
    cgroups = len(set(plan.endpoint_cgroups) | {e.cgroup for e in plan.exemptions})
    ports, nets = 0, len(plan.lan)
    for rules in plan.exemptions:
        p, n = rules.counts
        ports += p
        nets += n
    check_counts(cgroups, ports, nets, len(plan.endpoints), len(plan.dns))


def check_counts(cgroups: int, ports: int, nets: int, endpoints: int = 0, dns: int = 0) -> None:
    """check_capacity of counts: exempt and endpoint cgroups, port and network rules
    (LAN included), endpoints, DNS servers."""
    for what, count, unit, limit in (
        ("tunnel.endpoints", endpoints, "endpoints", MAX_ENDPOINTS),
        ("dns.servers", dns, "servers", MAX_DNS),
        ("exempt", cgroups, "exempt and endpoint cgroups", MAX_CGROUPS),
        ("exempt", ports, "port rules (a port range takes one per aligned block)", MAX_RULES),
        ("exempt and lan.networks", nets, "network rules", MAX_RULES),
    ):
        if count > limit:
            raise CapacityError(f"{what}: {count} {unit}, the BPF layer holds at most {limit}")


@dataclass(frozen=True)
class Capacity:
    """How many endpoints one policy version of a build may hold. A hash map allocates its
    buckets for max_entries up front (16 bytes each) even without preallocated elements,
    so the endpoint map grows with the policy in powers of two instead of being 2 MiB for
    one endpoint; every other map is fixed (small, or an LPM trie, which allocates per entry)."""

    endpoints: int = MIN_ENDPOINT_TIER

    @classmethod
    def for_plan(cls, plan: BpfPlan) -> Capacity:
        tier = MIN_ENDPOINT_TIER
        while tier < len(plan.endpoints):
            tier *= 2
        return cls(tier)

    def holds(self, plan: BpfPlan) -> bool:
        return len(plan.endpoints) <= self.endpoints

    def cflags(self) -> list[str]:
        return [
            f"-DKS_MAX_ENDPOINTS={2 * self.endpoints}",
            f"-DKS_MAX_DNS={2 * MAX_DNS}",
            f"-DKS_MAX_CGROUPS={2 * MAX_CGROUPS}",
            f"-DKS_MAX_RULES={2 * MAX_RULES}",
            f"-DKS_TUNNEL_INDEX={TUNNEL_INDEX}",
            f"-DKS_MAX_TUNNELS={MAX_BIG_TUNNELS}",
        ]


def check_events_bytes(n: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    if n < page or n & (n - 1) or n > 1 << 30:
        raise BpfError(f"event ring buffer size {n}: a power of two from the page size ({page}) to 1 GiB")
    return n


def cflags(netns_mode: str, pin_dir: Path | None, capacity: Capacity | None = None,
           events_bytes: int = EVENTS_BYTES, nft_events: btf.KfreeSkb | None = None,
           task_helpers: bool = True) -> list[str]:
    """Constants for the C source. Policy never goes here: it goes into maps.
    `nft_events`: how to build the kfree_skb program for this kernel (None: not built);
    `task_helpers`: probe_sock_task_helpers()."""
    flags = [f"-DKS_R_{r.value.upper()}={REASON_NUMBERS[r]}" for r in DROP_REASONS]
    flags += [f"-DKS_MAX_DEPTH={MAX_CGROUP_DEPTH}", f"-DKS_MAX_DROP_KEYS={MAX_DROP_KEYS}"]
    flags += (capacity or Capacity()).cflags()
    flags += [f"-DKS_EVENTS_BYTES={check_events_bytes(events_bytes)}", f"-DKS_EVENTS_PER_SEC={EVENTS_PER_SEC}",
              f"-DKS_EVENTS_RATE_KEYS={EVENTS_RATE_KEYS}"]
    if nft_events is not None:
        flags += nft_events.cflags()
    if not task_helpers:
        flags.append("-DKS_NO_TASK_HELPERS")
    if netns_mode == "sk_storage":
        flags.append("-DKS_NETNS_SK_STORAGE")
    if pin_dir is not None:
        flags.append(f'-DKS_DROPS_PIN="{pin_dir / DROPS_PIN}"')
        flags.append(f'-DKS_OWNERS_PIN="{pin_dir / OWNERS_PIN}"')
        flags.append(f'-DKS_EVENTS_PIN="{pin_dir / EVENTS_PIN}"')
        flags.append(f'-DKS_EVENTS_LOST_PIN="{pin_dir / EVENTS_LOST_PIN}"')
        flags.append(f'-DKS_EVENTS_RATE_PIN="{pin_dir / EVENTS_RATE_PIN}"')
    return flags


def nft_events_build() -> tuple[btf.KfreeSkb | None, str]:
    """(how to build the nftables drop-event program here, or None and why not)."""
    info = btf.running_kfree_skb()
    return (info, "") if isinstance(info, btf.KfreeSkb) else (None, info)


def build_digest(source_dir: Path, flags: list[str], source: headers.KernelSource, netns_mode: str) -> bytes:
    """What a build of the programs depends on, as 32 bytes: equal digests, equal programs."""
    h = hashlib.sha256()
    for path in sorted(p for p in source_dir.iterdir() if p.suffix in (".c", ".h")):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    h.update(json.dumps([flags, str(source.path), source.release, source.env, netns_mode, ksbpf.__version__]).encode())
    return h.digest()


# ---------------------------------------------------------------- policy versions (pure)


@dataclass(frozen=True)
class CgroupEntry:
    """A ks_cgroups value (struct ks_cgroup). `digest` lives in the struct's pad, which the
    programs never read: the low 32 bits of the exemption's ExemptionRules.digest, so that a
    later write can tell which entries a new version changes from the map alone."""

    rules: int = 0
    mark: int = 0
    endpoint: int = 0
    digest: int = 0

    def pack(self) -> bytes:
        return struct.pack(CGROUP_FMT, self.rules, self.mark, self.endpoint, self.digest)

    @classmethod
    def unpack(cls, raw: bytes) -> CgroupEntry:
        r, m, e, d = struct.unpack(CGROUP_FMT, raw)
        return cls(r, m, e, d)


@dataclass(frozen=True)
class CgroupWant:
    """What one cgroup id is in a policy: its exemption (if any), mark, endpoint flag."""

    rules: ExemptionRules | None
    mark: int
    endpoint: bool

    def entry(self, rule_set: int) -> CgroupEntry:
        """Its ks_cgroups value with its exemption as rule set `rule_set`."""
        digest = self.rules.digest & 0xFFFFFFFF if self.rules is not None else 0
        return CgroupEntry(rule_set if self.rules is not None else 0, self.mark, int(self.endpoint), digest)

    @cached_property
    def _tail(self) -> bytes:
        return self.entry(0).pack()[4:]

    @cached_property
    def mix(self) -> int:
        """Of everything but the cgroup id, as 64 bits (see Version.digest)."""
        data = self._tail + (self.rules.digest.to_bytes(8, "little") if self.rules is not None else b"-")
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    def written_as(self, raw: bytes | None) -> bool:
        """Does a packed ks_cgroups value already say this (whatever its rule set id)?"""
        return raw is not None and raw[4:] == self._tail and (raw[:4] != b"\0\0\0\0") == (self.rules is not None)


def cgroup_wants(plan: BpfPlan, ids: Mapping[str, int | None]) -> dict[int, CgroupWant]:
    """ks_cgroups entries of a plan, by the cgroup ids its paths resolved to (None: not there)."""
    out: dict[int, CgroupWant] = {}
    for rules in plan.exemptions:
        cid = ids.get(rules.cgroup)
        if cid is not None:
            out[cid] = rules.want
    for path in plan.endpoint_cgroups:
        cid = ids.get(path)
        if cid is None:
            continue
        e = out.get(cid, CgroupWant(None, 0, False))
        # One cgroup both exempt and endpoint: the endpoint mark wins, the VPN needs it.
        out[cid] = CgroupWant(e.rules, plan.endpoint_cgroup_mark or e.mark, True)
    return out


def cgroups_changed(held: Mapping[int, bytes], want: Mapping[int, CgroupWant]) -> list[int]:
    """Cgroup ids whose ks_cgroups entry (`held`: packed values) must change (added,
    removed or different), sorted."""
    out = [cid for cid, w in want.items() if not w.written_as(held.get(cid))]
    out += [cid for cid in held if cid not in want]
    return sorted(out)


def _digest(items: Iterable[bytes]) -> int:
    """Of a set of byte strings, as 64 bits."""
    data = b"".join(len(item).to_bytes(4, "little") + item for item in sorted(set(items)))
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


DIGESTS = ("endpoints", "dns", "lan", "cgroups")
_M64 = (1 << 64) - 1


def cgroup_term(cid: int, w: CgroupWant) -> int:
    """One entry's share of the cgroups digest (Version.digest), less its count of one."""
    return (cid * 0x9E3779B97F4A7C15 & _M64) ^ w.mix


def cgroups_digest_changed(digest: int, cid: int, old: CgroupWant | None, new: CgroupWant | None) -> int:
    """The cgroups digest of a version after one entry changed from `old` to `new` (None: absent)."""
    if old is not None:
        digest -= 1 + cgroup_term(cid, old)
    if new is not None:
        digest += 1 + cgroup_term(cid, new)
    return digest & _M64


@dataclass(frozen=True)
class Version:
    """A policy version as the maps should hold it, before tags, rule set ids and banks are
    chosen. A part left None is kept as the live version has it. Pure."""

    header: Config | None = None  # its cookie, generation, cgroup, flags, mark, build, instance
    endpoints: tuple[bytes, ...] | None = None
    dns: tuple[bytes, ...] | None = None
    lan: tuple[IPNetwork, ...] | None = None
    cgroups: Mapping[int, CgroupWant] | None = None
    tunnels: frozenset[int] | None = None

    def digest(self, part: str) -> int | None:
        if part == "endpoints" and self.endpoints is not None:
            return _digest(self.endpoints)
        if part == "dns" and self.dns is not None:
            return _digest(self.dns)
        if part == "lan" and self.lan is not None:
            return _digest(net_key(0, n) for n in self.lan)
        if part == "cgroups" and self.cgroups is not None:
            # A sum of per-entry mixes: cheap for tens of thousands of exemptions whose mixes
            # are kept (ExemptionRules.want). Which entries changed is decided against the
            # map itself (cgroups_changed); this is bookkeeping.
            total = len(self.cgroups)
            for cid, w in self.cgroups.items():
                total += cgroup_term(cid, w)
            return total & _M64
        return None


@dataclass(frozen=True)
class Held:
    """What a generation's maps hold under the live version's tags, as read back from the
    kernel (None: not read). In-place updates are computed against this, not against a
    memory of what was written, so they also repair entries deleted behind our back."""

    endpoints: frozenset[bytes] | None = None  # untagged endpoint_key()s
    dns: frozenset[bytes] | None = None  # untagged addr_key()s
    cgroups: Mapping[int, bytes] | None = None  # cgroup id -> packed CgroupEntry
    reserved_rules: int = 0  # the ks_cgroups bookkeeping entry (RESERVE_KEY): no id below it is fresh


_HEADER_FIELDS = ("netns_cookie", "generation", "cgroup_id", "flags", "endpoint_mark", "build", "instance")

# Paths of an update (Step.path):
PATH_NEW = "new"  # a new generation, everything written as its first version
PATH_VERSIONED = "versioned"  # what changed written beside the live version, then ks_active flips
PATH_DELTA = "delta"  # endpoint and DNS keys added and deleted in place under the live tags
PATH_ONE_CGROUP = "one cgroup"  # one ks_cgroups entry replaced in place, its rules under a fresh id


@dataclass(frozen=True)
class Step:
    """One update of a generation's maps: the config to flip to and what to write first."""

    config: Config
    changed: tuple[str, ...]  # of "config", "tunnels", *DIGESTS
    exemption_rules: Mapping[int, int]  # cgroup id -> its new rule set id, when "cgroups" changed
    path: str = PATH_VERSIONED  # "" when nothing changed
    # PATH_DELTA: part ("endpoints", "dns") -> (untagged keys to add, keys to delete)
    delta: Mapping[str, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = field(default_factory=dict)
    cgroup: int | None = None  # PATH_ONE_CGROUP: the cgroup id whose entry changes

    def describe(self) -> tuple[str, ...]:
        """What was written and how, e.g. ("endpoints (delta +1 -0)",)."""
        if self.path == PATH_DELTA:
            return tuple(f"{part} (delta +{len(a)} -{len(r)})" for part, (a, r) in self.delta.items())
        if self.path == PATH_ONE_CGROUP:
            return (f"cgroups (one cgroup {self.cgroup})",)
        if self.path == PATH_VERSIONED:
            return tuple(f"{part} (versioned)" for part in self.changed)
        return self.changed


def plan_step(live: Config | None, live_tunnels: frozenset[int], want: Version, held: Held | None = None) -> Step:
    """Decide an update from the live version (None: a new generation, nothing written yet),
    what the maps hold under its tags (`held`, where read) and the wanted version. Pure.

    A part differs when its digest does or, where held was read, when the maps do not hold
    it. How it is written:
    - PATH_DELTA when only endpoint and/or DNS sets differ: each packet makes one lookup in
      one of those maps, so adding and deleting keys in place under the live tag judges it
      by the old set or the new, never a mix; the config keeps its tags.
    - PATH_ONE_CGROUP when only ks_cgroups differs, in exactly one entry: a packet's ancestor
      walk sees that one entry old or new; its rules go under a fresh rule set id first.
    - PATH_VERSIONED otherwise: parts that differ get the new version's tag, fresh rule set
      ids or the other tunnel bank; the rest is shared with the live version.
    The in-place paths change only bookkeeping in the config (version, digests, next_rules),
    which no program reads: the live slot is rewritten in place, with no flip."""
    if live is None:
        if want.header is None:
            raise ValueError("a new generation needs a whole version")
        base = replace(want.header, version=0, endpoints_tag=0, dns_tag=0, cgroups_tag=0, lan_rules=0,
                       next_rules=1, tunnel_bank=1, digests=(0, 0, 0, 0))
    else:
        base = live
    held = held or Held()
    version = base.version + 1
    cfg = replace(base, version=version)
    changed: list[str] = []
    if want.header is not None and live is not None:
        if any(getattr(want.header, f) != getattr(live, f) for f in _HEADER_FIELDS):
            changed.append("config")
    if want.header is not None:
        cfg = replace(cfg, **{f: getattr(want.header, f) for f in _HEADER_FIELDS})
    if want.tunnels is not None and (live is None or want.tunnels != live_tunnels):
        changed.append("tunnels")
        cfg = replace(cfg, tunnel_bank=1 - base.tunnel_bank)
    digests = list(base.digests)
    next_rules = max(base.next_rules, held.reserved_rules)
    wanted_sets = {"endpoints": want.endpoints, "dns": want.dns}
    held_sets = {"endpoints": held.endpoints, "dns": held.dns}
    delta: dict[str, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = {}
    cgroup_diff: list[int] | None = None
    for i, part in enumerate(DIGESTS):
        d = want.digest(part)
        if d is None:
            continue
        differs = live is None or d != live.digests[i]
        if live is not None and part in held_sets:
            keys, have = wanted_sets[part], held_sets[part]
            if keys is not None and have is not None:
                wanted = frozenset(keys)
                delta[part] = (tuple(sorted(wanted - have)), tuple(sorted(have - wanted)))
                differs = differs or wanted != have
        if live is not None and part == "cgroups" and held.cgroups is not None:
            assert want.cgroups is not None
            cgroup_diff = cgroups_changed(held.cgroups, want.cgroups)
            differs = differs or bool(cgroup_diff)
        if differs:
            changed.append(part)
            digests[i] = d

    in_place = live is not None and changed and "config" not in changed and "tunnels" not in changed
    if in_place and set(changed) <= {"endpoints", "dns"} and all(p in delta for p in changed):
        cfg = replace(cfg, digests=(digests[0], digests[1], digests[2], digests[3]))
        return Step(cfg, tuple(changed), {}, PATH_DELTA, {p: delta[p] for p in changed})
    if in_place and changed == ["cgroups"] and cgroup_diff is not None and len(cgroup_diff) == 1:
        assert want.cgroups is not None and held.cgroups is not None
        (cid,) = cgroup_diff
        cfg = replace(cfg, digests=(digests[0], digests[1], digests[2], digests[3]))
        return one_cgroup_step(cfg, next_rules, cid, want.cgroups.get(cid), held.cgroups.get(cid))

    rules: dict[int, int] = {}
    for part in DIGESTS:
        if part not in changed:
            continue
        if part == "endpoints":
            cfg = replace(cfg, endpoints_tag=version)
        elif part == "dns":
            cfg = replace(cfg, dns_tag=version)
        elif part == "lan":
            lan_rules = 0
            if want.lan:
                lan_rules, next_rules = next_rules, next_rules + 1
            cfg = replace(cfg, lan_rules=lan_rules)
        else:
            assert want.cgroups is not None
            for cid, w in sorted(want.cgroups.items()):
                if w.rules is not None:
                    rules[cid], next_rules = next_rules, next_rules + 1
            cfg = replace(cfg, cgroups_tag=version)
    cfg = replace(cfg, digests=(digests[0], digests[1], digests[2], digests[3]), next_rules=next_rules)
    path = PATH_NEW if live is None else PATH_VERSIONED if changed else ""
    return Step(cfg, tuple(changed), rules, path)


def one_cgroup_step(cfg: Config, next_rules: int, cid: int, w: CgroupWant | None, raw: bytes | None) -> Step:
    """PATH_ONE_CGROUP of cgroup id `cid` from its entry `raw` (None: absent) to `w` (None:
    none). `cfg`: the config to write (version and digests already the new ones);
    `next_rules`: the first rule set id no write has used. Pure."""
    old = CgroupEntry.unpack(raw) if raw is not None else None
    rules: dict[int, int] = {}
    if w is not None and w.rules is not None:
        if old is not None and old.rules and old.digest == w.entry(0).digest:
            rules[cid] = old.rules  # same grant, only its mark or endpoint flag changed
        else:
            rules[cid], next_rules = next_rules, next_rules + 1
    return Step(replace(cfg, next_rules=next_rules), ("cgroups",), rules, PATH_ONE_CGROUP, cgroup=cid)


# ---------------------------------------------------------------- run-time exemption changes (pure)


def natural_id(path: str) -> int:
    """The exemption id a path gets when no other path took it first (see exemption_ids)."""
    return (zlib.crc32(path.encode()) & marks.EXEMPT_ID_MASK) or 1


def _probe_passes(slot: int, natural: int, assigned: int) -> bool:
    """Did exemption_ids' probe from `natural` to `assigned` pass over `slot` (taken then)?
    Ids are 1..EXEMPT_ID_MASK and a probe steps i -> i % MASK + 1, +1 modulo MASK."""
    m = marks.EXEMPT_ID_MASK
    return (slot - natural) % m < (assigned - natural) % m


@dataclass
class ExemptionIndex:
    """What change_exemptions needs of a policy's exemptions as a whole, kept one change at
    a time: their ids (exemption_ids, hence marks), rule counts (capacity), and whether
    their paths can be trusted to name distinct cgroups."""

    exemptions: tuple[Exemption, ...]  # the policy's, as written last
    ids: dict[str, int]  # path -> exemption id
    by_id: dict[int, str]
    probed: dict[str, int]  # path -> its natural id, for the few whose id is not it
    ports: int  # ks_ports keys of all exemptions (ExemptionRules.counts)
    nets: int  # ks_nets keys of all exemptions, LAN not included
    # Duplicate or non-canonical paths: two paths may then be one cgroup, whose entry a
    # one-path change cannot compute alone.
    odd: bool

    @classmethod
    def build(cls, exemptions: tuple[Exemption, ...], rules: tuple[ExemptionRules, ...]) -> ExemptionIndex:
        """From a policy's exemptions and their render (_render_exemptions: same order)."""
        ids: dict[str, int] = {}
        probed: dict[str, int] = {}
        ports = nets = 0
        mask = marks.EXEMPT_ID_MASK
        for r in rules:
            i = r.mark & mask
            ids[r.cgroup] = i
            n = natural_id(r.cgroup)
            if n != i:
                probed[r.cgroup] = n
            p, q = r.counts
            ports += p
            nets += q
        odd = len(ids) != len(exemptions) or any(_normalized(p) != p for p in ids)
        return cls(exemptions, ids, {i: p for p, i in ids.items()}, probed, ports, nets, odd)

    def apply(self, change: ExemptionChange, exemptions: tuple[Exemption, ...]) -> None:
        """Take a change select_change chose (and that was written)."""
        path = change.path
        if change.old is not None and change.old_rules is not None:
            p, n = change.old_rules.counts
            self.ports -= p
            self.nets -= n
        if change.new is not None and change.new_rules is not None:
            p, n = change.new_rules.counts
            self.ports += p
            self.nets += n
        if change.new is None:
            del self.by_id[self.ids.pop(path)]
            self.probed.pop(path, None)
        elif change.old is None:
            self.ids[path] = change.id
            self.by_id[change.id] = path
        self.exemptions = exemptions


@dataclass(frozen=True)
class ExemptionChange:
    """The one exemption path whose exemption differs between two policies."""

    path: str
    old: Exemption | None  # before's (None: not exempt before)
    new: Exemption | None  # after's (None: not exempt after)
    id: int  # its exemption id (a path keeps its id while exempt)
    old_rules: ExemptionRules | None
    new_rules: ExemptionRules | None
    cgroups: int  # exempt and endpoint cgroups of `after` (capacity)
    ports: int  # port rules of `after`
    nets: int  # network rules of `after`, LAN included


def diff_exemptions(before: tuple[Exemption, ...], after: tuple[Exemption, ...],
                    limit: int = 1) -> list[tuple[Exemption | None, Exemption | None]] | None:
    """(before's, after's) exemption of each path whose exemption differs; None when more
    than `limit` do. Identity first, then ==: merge_exemptions keeps unchanged Exemption
    objects, so one exemption added, removed or replaced in a sorted tuple costs a scan by
    identity; anything else is compared path by path."""
    if before is after:
        return []
    nb, na = len(before), len(after)
    # The first position that differs: a binary search of prefix compares (C-level).
    lo, hi = 0, min(nb, na)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if before[:mid] == after[:mid]:
            lo = mid
        else:
            hi = mid - 1
    i = lo
    if i == nb == na:
        return []
    # One insertion, deletion or replacement at i, the rest the same (C-level compares)?
    if na == nb + 1 and after[i + 1:] == before[i:]:
        return [(None, after[i])]
    if nb == na + 1 and before[i + 1:] == after[i:]:
        return [(before[i], None)]
    if na == nb and before[i + 1:] == after[i + 1:]:
        if before[i].cgroup == after[i].cgroup:
            return [(before[i], after[i])]
        if limit < 2:
            return None
    old = {e.cgroup: e for e in before}
    new = {e.cgroup: e for e in after}
    out: list[tuple[Exemption | None, Exemption | None]] = []
    for path in sorted(old.keys() | new.keys()):
        x2, y2 = old.get(path), new.get(path)
        if x2 is y2 or (x2 is not None and y2 is not None and x2 == y2):
            continue
        out.append((x2, y2))
        if len(out) > limit:
            return None
    return out


def select_change(before: Policy, after: Policy, index: ExemptionIndex | None) -> ExemptionChange | str | None:
    """Whether going from `before` (what the maps hold) to `after` changes the wanted entry
    of exactly one exemption path, everything else kept: None when nothing differs, the
    change, or why not (the caller then writes `after` whole). Pure (index: of `before`)."""
    bt, at = before.tunnel, after.tunnel
    if bt.endpoint_cgroups != at.endpoint_cgroups or bt.endpoint_mark != at.endpoint_mark:
        return "endpoint cgroups differ"
    if before.lan != after.lan:
        return "lan differs"
    diff = diff_exemptions(before.exemptions, after.exemptions)
    if diff is None:
        return "more than one exemption differs"
    if not diff:
        return None
    if index is None:
        return "no index of the written exemptions"
    if index.exemptions is not before.exemptions and index.exemptions != before.exemptions:
        return "the exemptions written last are not `before`'s"
    if index.odd:
        return "duplicate or non-canonical exemption paths"
    ((old, new),) = diff
    path = (old or new).cgroup  # type: ignore[union-attr]
    if _normalized(path) != path or any(_normalized(c) != c for c in at.endpoint_cgroups):
        return "a non-canonical cgroup path"
    if old is not None:
        eid = index.ids.get(path)
        if eid is None:
            return "the index lacks the changed path"
    else:
        if path in index.ids:
            return "the index already has the added path"
        eid = natural_id(path)
        if eid in index.by_id:
            return "its exemption id collides with another's (marks move)"
    if new is None:
        for q, n in index.probed.items():
            if q > path and _probe_passes(eid, n, index.ids[q]):
                return "removing it moves another exemption's id (marks move)"
    mark = exempt_mark(eid)
    old_rules = _rules_for(old, mark) if old is not None else None
    new_rules = _rules_for(new, mark) if new is not None else None
    ports, nets = index.ports, index.nets + len(after.lan_networks(4)) + len(after.lan_networks(6))
    for rules, sign in ((old_rules, -1), (new_rules, 1)):
        if rules is not None:
            p, n = rules.counts
            ports += sign * p
            nets += sign * n
    count = len(index.ids) + (new is not None) - (old is not None)
    for c in set(at.endpoint_cgroups):
        if not ((c == path and new is not None) or (c != path and c in index.ids)):
            count += 1
    return ExemptionChange(path, old, new, eid, old_rules, new_rules, count, ports, nets)


def change_want(rules: ExemptionRules | None, endpoint: bool, endpoint_mark: int) -> CgroupWant | None:
    """The wanted ks_cgroups entry of one path (cgroup_wants for one), None when it has none."""
    if not endpoint:
        return rules.want if rules is not None else None
    return CgroupWant(rules, endpoint_mark or (rules.mark if rules is not None else 0), True)


# =========================================================================== loader child


@dataclass(frozen=True)
class LoadStats:
    compile_s: float  # clang + LLVM in BCC
    load_s: float  # the verifier, both programs
    loader_s: float  # the whole child, python start and bcc import included
    peak_rss_kb: int  # the child's VmHWM
    netns_mode: str
    # Why the nftables drop-event program (ks_kfree_skb) is not attached ("" : it is).
    nft_events: str = ""

    @classmethod
    def nothing(cls, netns_mode: str) -> LoadStats:
        """An apply that reused the live generation: no loader ran."""
        return cls(0.0, 0.0, 0.0, 0, netns_mode)


def _source_dir() -> Path:
    # Editable and wheel installs both give a real directory; zipped installs are unsupported.
    return Path(str(importlib.resources.files("ksbpf.bpf")))


def _run_loader(source: headers.KernelSource, netns_mode: str, flags: list[str], gen_dir: Path | None,
                nft: btf.KfreeSkb | None = None, nft_why: str = "") -> LoadStats:
    request = {
        "source_dir": str(_source_dir()),
        "cflags": flags,
        "gen_dir": str(gen_dir) if gen_dir else None,
        "nft_btf_id": nft.btf_id if nft is not None else None,
    }
    env = {k: v for k, v in os.environ.items() if k != headers.ENV_VAR}
    env.update(source.env)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ksbpf.linux.bpf"],
            input=json.dumps(request), capture_output=True, text=True, timeout=300, env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BpfError(f"BPF loader process failed: {e}") from None
    wall = time.monotonic() - t0
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or "error" in reply or not reply:
        raise BpfError(_loader_failure(reply.get("error", f"loader exited with {proc.returncode}"),
                                       proc.stderr, source))
    return LoadStats(reply["compile_s"], reply["load_s"], wall, reply["peak_rss_kb"], netns_mode,
                     reply.get("nft_events", "") if nft is not None else nft_why)


def load_tracing(insns: bytes, name: str, btf_id: int) -> int:
    """BPF_PROG_LOAD of a tp_btf program from BCC's compiled instructions. BCC loads tracing
    programs only as fentry/fexit (by a kfunc__ name); a BTF tracepoint needs the
    tracepoint's btf_trace_* id and BPF_TRACE_RAW_TP, which this passes itself."""
    prog = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 20)
    a = _attr()
    struct.pack_into("<IIQQIIQ", a, 0, PROG_TRACING, len(insns) // 8, ctypes.addressof(prog),
                     ctypes.addressof(lic), 1, len(log), ctypes.addressof(log))
    struct.pack_into("<16s", a, 48, name.encode()[:15])
    struct.pack_into("<I", a, 68, ATTACH_TRACE_RAW_TP)
    struct.pack_into("<I", a, 108, btf_id)
    try:
        return _sys_bpf(_BPF_PROG_LOAD, a, f"loading {name}")
    except OSError as e:
        tail = [ln for ln in log.value.decode(errors="replace").splitlines() if ln.strip()][-3:]
        raise OSError(e.errno, f"{e.strerror}{': ' + ' / '.join(tail) if tail else ''}") from None


def raw_tracepoint_open(prog_fd: int) -> int:
    """Attach a tp_btf program: a bpf_link fd (pin it to outlive this process)."""
    a = _attr()
    struct.pack_into("<QI", a, 0, 0, prog_fd)
    return _sys_bpf(_BPF_RAW_TRACEPOINT_OPEN, a, "attaching the tracepoint")


def _loader_failure(error: str, stderr: str, source: headers.KernelSource) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if any("Unable to find kernel headers" in ln for ln in lines):
        return (f"BCC found no usable kernel headers at {source.describe()}: run `ksctl doctor --prepare-headers "
                f"{headers.DEFAULT_HEADERS_DIR}` or set [bpf] kernel_source")
    errors = [ln for ln in lines if "error:" in ln]
    detail = "; ".join(errors[:3]) if errors else " / ".join(lines[-6:])
    return f"{error} (headers: {source.describe()}){': ' + detail if detail else ''}"


def _loader_main() -> int:
    """The child: compile, load, pin into gen_dir; one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        from bcc import BPF
    except ImportError as e:
        print(json.dumps({"error": f"python3-bpfcc (bcc) is not importable: {e}"}))
        return 1
    src = Path(request["source_dir"])
    t0 = time.monotonic()
    try:
        b = BPF(text=(src / SOURCE).read_text(), cflags=[f"-I{src}", "-Wno-unused-function", *request["cflags"]])
    except Exception as e:  # BCC raises bare Exception; stderr has the compiler's words
        print(json.dumps({"error": f"compiling {SOURCE} failed: {e}"}))
        return 1
    t1 = time.monotonic()
    fns = {}
    try:
        fns["egress"] = b.load_func(PROGS["egress"], BPF.CGROUP_SKB, attach_type=ATTACH_EGRESS)
        fns["sock_create"] = b.load_func(PROGS["sock_create"], BPF.CGROUP_SOCK, attach_type=ATTACH_SOCK_CREATE)
        flush = b.load_func(EVENTS_FLUSH_PROG, BPF.CGROUP_SKB, attach_type=ATTACH_EGRESS)
    except Exception as e:  # BCC raises bare Exception; stderr has the verifier log
        print(json.dumps({"error": f"the kernel refused the program: {e}"}))
        return 1
    from bcc import lib

    # The drop-event program is an observer: the kill switch is enforced without it, so a
    # kernel that refuses it costs the events of the nftables layer, never the generation.
    nft_events, nft_fd = "", -1
    if request.get("nft_btf_id") is not None:
        fn_name = NFT_EVENTS_PROG.encode()
        try:
            insns = ctypes.string_at(lib.bpf_function_start(b.module, fn_name), lib.bpf_function_size(b.module, fn_name))
            nft_fd = load_tracing(insns, NFT_EVENTS_PROG, request["nft_btf_id"])
        except OSError as e:
            nft_events = f"the kernel refused {NFT_EVENTS_PROG}: {e.strerror}"
    t2 = time.monotonic()

    gen_dir = request["gen_dir"]
    if gen_dir:
        try:
            os.mkdir(gen_dir)
            for name in GEN_MAPS:
                obj_pin(lib.bpf_table_fd(b.module, name.encode()), Path(gen_dir) / name)
            for kind, fn in fns.items():
                obj_pin(fn.fd, Path(gen_dir) / kind)
            obj_pin(flush.fd, Path(gen_dir) / EVENTS_FLUSH_PIN)
        except OSError as e:
            print(json.dumps({"error": f"pinning under {gen_dir} failed: {e}"}))
            return 1
        if nft_fd >= 0:
            # Attached before the generation is filled: it reads the generation's zeroed
            # config (netns cookie 0) until then and reports nothing.
            try:
                obj_pin(raw_tracepoint_open(nft_fd), Path(gen_dir) / NFT_EVENTS_LINK)
            except OSError as e:
                nft_events = f"attaching {NFT_EVENTS_PROG} to kfree_skb failed: {e.strerror}"
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"compile_s": t1 - t0, "load_s": t2 - t1, "peak_rss_kb": peak, "nft_events": nft_events}))
    return 0


# =========================================================================== kernel state


def _bpffs_mounted() -> bool:
    return bpffs.is_bpffs(BPFFS)


@dataclass(frozen=True)
class Config:
    """struct ks_config: one policy version, and the loader's bookkeeping about it."""

    netns_cookie: int
    generation: int
    cgroup_id: int
    flags: int
    endpoint_mark: int
    instance: str
    version: int = 0
    endpoints_tag: int = 0
    dns_tag: int = 0
    cgroups_tag: int = 0
    lan_rules: int = 0
    next_rules: int = 1
    tunnel_bank: int = 0
    digests: tuple[int, int, int, int] = (0, 0, 0, 0)  # as DIGESTS
    build: bytes = b"\0" * 32

    def pack(self) -> bytes:
        return struct.pack(CONFIG_FMT, self.netns_cookie, self.generation, self.cgroup_id, self.flags,
                           self.endpoint_mark, self.version, self.endpoints_tag, self.dns_tag, self.cgroups_tag,
                           self.lan_rules, self.next_rules, self.tunnel_bank, *self.digests, self.build,
                           self.instance.encode())

    @classmethod
    def unpack(cls, raw: bytes) -> Config:
        (c, g, cg, fl, m, ver, etag, dtag, ctag, lan, nxt, tbank, d0, d1, d2, d3, build,
         inst) = struct.unpack_from(CONFIG_FMT, raw)
        return cls(c, g, cg, fl, m, inst.split(b"\0", 1)[0].decode(errors="replace"), ver, etag, dtag, ctag, lan,
                   nxt, tbank, (d0, d1, d2, d3), build)


_KEY0 = struct.pack("<I", 0)


def _active_config(active: BpfMap, configs: BpfMap) -> tuple[int, Config] | None:
    """(slot, config) of the version packets use now."""
    raw = active.lookup(_KEY0)
    if raw is None:
        return None
    slot = struct.unpack("<I", raw)[0] & 1
    cfg = configs.lookup(struct.pack("<I", slot))
    return (slot, Config.unpack(cfg)) if cfg else None


@dataclass
class Generation:
    number: int
    path: Path

    def map(self, name: str) -> BpfMap:
        return BpfMap.pinned(self.path / name)

    def active(self) -> tuple[int, Config] | None:
        try:
            with self.map("ks_active") as a, self.map("ks_config") as c:
                return _active_config(a, c)
        except OSError:
            return None

    def config(self) -> Config | None:
        live = self.active()
        if live is None and not (self.path / "ks_active").exists():
            try:
                with self.map("ks_config") as c:
                    return _legacy_config(c)
            except OSError:
                return None
        return live[1] if live else None

    def capacity(self) -> Capacity | None:
        """What the generation was built to hold, from its endpoint map's size."""
        try:
            with self.map("ks_endpoints") as m:
                return Capacity(m.info.max_entries // 2)
        except OSError:
            return None

    def prog_fd(self, kind: str) -> int:
        return obj_get(self.path / kind)

    def prog_id(self, kind: str) -> int | None:
        try:
            fd = self.prog_fd(kind)
        except OSError:
            return None
        try:
            return prog_info(fd).id
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Attached:
    """One of our programs on a cgroup, found by asking the kernel (pins may be gone)."""

    kind: str
    prog_id: int
    generation: int
    cgroup: Path


def _legacy_config(configs: BpfMap) -> Config | None:
    """The one-version ks_config of programs from before policy versions: recognised, so
    that an upgrade replaces and `down` removes them."""
    if configs.info.value_size != struct.calcsize(LEGACY_CONFIG_FMT):
        return None
    raw = configs.lookup(_KEY0)
    if raw is None:
        return None
    c, g, cg, fl, m, inst = struct.unpack_from(LEGACY_CONFIG_FMT, raw)
    return Config(c, g, cg, fl, m, inst.split(b"\0", 1)[0].decode(errors="replace"))


def _prog_config(prog_id: int) -> Config | None:
    """The live ks_config of an attached program, if it is one of ksbpf's."""
    try:
        fd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, prog_id, f"open program id {prog_id}")
    except OSError:
        return None
    try:
        info = prog_info(fd)
    finally:
        os.close(fd)
    if info.name not in PROGS.values():
        return None
    maps: dict[str, BpfMap] = {}
    try:
        for mid in info.map_ids:
            try:
                m = BpfMap.by_id(mid)
            except OSError:
                continue
            if m.info.name in ("ks_active", "ks_config"):
                maps[m.info.name] = m
            else:
                m.close()
        if "ks_config" in maps and "ks_active" not in maps:
            return _legacy_config(maps["ks_config"])
        if len(maps) < 2:
            return None
        live = _active_config(maps["ks_active"], maps["ks_config"])
        return live[1] if live else None
    except OSError:
        return None
    finally:
        for m in maps.values():
            m.close()


@dataclass(frozen=True)
class ApplyStats:
    generation: int
    load: LoadStats  # LoadStats.nothing() when the live generation was reused
    apply_s: float  # the whole apply(), loader included
    # "first", "atomic", "make-before-break" (a new generation), "in place" (the live one's
    # maps updated) or "unchanged" (nothing to write)
    replacement: str
    rss_kb: int  # this process after apply (the daemon's steady state; bcc is never imported here)
    compiled: bool = True
    changed: tuple[str, ...] = ()  # what an in-place apply wrote or repaired
    # how, per part: e.g. ("endpoints (delta +1 -0)",) or ("dns (versioned)",) (Step.describe)
    writes: tuple[str, ...] = ()


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- map writing


@contextmanager
def _open_maps(gen: Generation) -> Iterator[dict[str, BpfMap]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(gen.map(name)) for name in GEN_MAPS}


def _tunnel_masks(maps: Mapping[str, BpfMap]) -> dict[int, int]:
    """ifindex -> bank bits, for every ifindex with a bit set."""
    out: dict[int, int] = {}
    for k, v in maps["ks_tunnels"].items():
        if v[0]:
            out[struct.unpack("<I", k)[0]] = v[0]
    for k in maps["ks_tunnels_big"].keys():
        ifindex, bank = struct.unpack(TUNNEL_KEY_FMT, k)
        out[ifindex] = out.get(ifindex, 0) | 1 << bank
    return out


def _tunnels_of(masks: Mapping[int, int], bank: int) -> frozenset[int]:
    return frozenset(i for i, m in masks.items() if m >> bank & 1)


def _write_tunnels(maps: Mapping[str, BpfMap], masks: Mapping[int, int], bank: int, wanted: frozenset[int]) -> None:
    """Make tunnel bank `bank` hold exactly `wanted`; the other bank stays."""
    bit = 1 << bank
    small: dict[bytes, bytes] = {}
    add: list[bytes] = []
    drop: list[bytes] = []
    for i in sorted(set(masks) | wanted):
        old = masks.get(i, 0)
        new = (old & ~bit) | (bit if i in wanted else 0)
        if new == old:
            continue
        if i < TUNNEL_INDEX:
            small[struct.pack("<I", i)] = bytes([new])  # one byte: a packet sees it old or new
        else:
            (add if new & bit else drop).append(struct.pack(TUNNEL_KEY_FMT, i, bank))
    maps["ks_tunnels"].update_many(small)
    maps["ks_tunnels_big"].update_many(dict.fromkeys(add, b"\1"))
    maps["ks_tunnels_big"].delete_many(drop)


# ks_cgroups bookkeeping, looked up by no program (cgroup ids start at 1 and the ancestor
# walks stop at id 0): its `rules` is the first rule set id that no write has used yet. A
# write raises it before it writes rules under new ids, so ids a write that died used (and
# whose keys it left) are never handed out again; only a versioned write sweeps those keys.
RESERVE_KEY = struct.pack(CGROUP_KEY_FMT, 0, 0, 0)


@dataclass
class _Read:
    """A generation's policy maps as read at the start of a write."""

    endpoint_keys: list[bytes] | None = None
    dns_keys: list[bytes] | None = None
    cgroup_items: dict[bytes, bytes] | None = None

    def held(self, live: Config | None) -> Held:
        if live is None:
            return Held()
        cgroups = None
        reserved = 0
        if self.cgroup_items is not None:
            tag = struct.pack("<I", live.cgroups_tag)
            cgroups = {int.from_bytes(k[:8], "little"): v for k, v in self.cgroup_items.items() if k[8:12] == tag}
            if RESERVE_KEY in self.cgroup_items:
                reserved = CgroupEntry.unpack(self.cgroup_items[RESERVE_KEY]).rules
        return Held(
            endpoints=None if self.endpoint_keys is None else
            frozenset(k[4:] for k in self.endpoint_keys if key_tag(k) == live.endpoints_tag),
            dns=None if self.dns_keys is None else frozenset(k[4:] for k in self.dns_keys if key_tag(k) == live.dns_tag),
            cgroups=cgroups,
            reserved_rules=reserved,
        )


def _read(maps: Mapping[str, BpfMap], want: Version, live: Config | None) -> _Read:
    """Batched reads (a few syscalls for tens of thousands of entries) of what `want` sets."""
    if live is None:
        return _Read()
    return _Read(
        endpoint_keys=maps["ks_endpoints"].keys() if want.endpoints is not None else None,
        dns_keys=maps["ks_dns"].keys() if want.dns is not None else None,
        cgroup_items=dict(maps["ks_cgroups"].items()) if want.cgroups is not None or want.lan is not None else None,
    )


def _write_tagged(m: BpfMap, keys: Iterable[bytes], tag: int, live_tag: int | None,
                  existing: list[bytes] | None = None) -> list[tuple[BpfMap, list[bytes]]]:
    """Write `keys` under `tag` beside the live version's (`live_tag`); returns what to
    delete once the new version is live. `existing`: the map's keys, if read already."""
    if existing is None:
        existing = m.keys() if live_tag is not None else []
    m.delete_many([k for k in existing if key_tag(k) != live_tag])  # left by a write that died
    m.update_many({tagged(tag, k): b"\1" for k in keys})
    return [(m, [k for k in existing if key_tag(k) == live_tag])]


def _write_rules(maps: Mapping[str, BpfMap], step: Step, want: Version, old: Config | None,
                 entries: dict[bytes, bytes] | None = None) -> list[tuple[BpfMap, list[bytes]]]:
    """LAN and exemption rules of the next version under their new rule set ids and, when
    exemptions changed, its ks_cgroups entries under its tag. Returns what to delete once
    the new version is live. `entries`: ks_cgroups as read already."""
    cfg = step.config
    cgm, ports, nets = maps["ks_cgroups"], maps["ks_ports"], maps["ks_nets"]
    if entries is None:
        entries = dict(cgm.items()) if old is not None else {}
    entries = {k: v for k, v in entries.items() if k != RESERVE_KEY}
    live_rules: set[int] = set()
    if old is not None:
        live_rules = {old.lan_rules} | {CgroupEntry.unpack(v).rules for k, v in entries.items()
                                        if struct.unpack(CGROUP_KEY_FMT, k)[1] == old.cgroups_tag}
    existing = {"ports": ports.keys() if old else [], "nets": nets.keys() if old else []}
    for m, keys in ((ports, existing["ports"]), (nets, existing["nets"])):
        m.delete_many([k for k in keys if rule_set_of(k) not in live_rules])  # left by a write that died
    if old is not None:
        cgm.update(RESERVE_KEY, CgroupEntry(cfg.next_rules).pack())

    new_ports: dict[bytes, bytes] = {}
    new_nets: dict[bytes, bytes] = {}
    if "lan" in step.changed and cfg.lan_rules:
        assert want.lan is not None
        new_nets.update(dict.fromkeys(lan_keys(want.lan, cfg.lan_rules), b"\1"))
    cleanup: list[tuple[BpfMap, list[bytes]]] = []
    new_rules = {cfg.lan_rules}
    if "cgroups" in step.changed:
        assert want.cgroups is not None
        live_tag = old.cgroups_tag if old else None
        cgm.delete_many([k for k in entries if struct.unpack(CGROUP_KEY_FMT, k)[1] != live_tag])
        new_entries: dict[bytes, bytes] = {}
        for cid, w in want.cgroups.items():
            rule_set = step.exemption_rules.get(cid, 0)
            if w.rules is not None:
                p, n = rule_keys(w.rules, rule_set)
                new_ports.update(dict.fromkeys(p, b"\1"))
                new_nets.update(dict.fromkeys(n, b"\1"))
            new_entries[cgroup_key(cid, cfg.cgroups_tag)] = w.entry(rule_set).pack()
        new_rules |= set(step.exemption_rules.values())
        ports.update_many(new_ports)
        nets.update_many(new_nets)
        cgm.update_many(new_entries)
        cleanup.append((cgm, [k for k in entries if struct.unpack(CGROUP_KEY_FMT, k)[1] == live_tag]))
    else:
        if old is not None:
            new_rules |= live_rules - {old.lan_rules}
        nets.update_many(new_nets)
    for m, keys in ((ports, existing["ports"]), (nets, existing["nets"])):
        cleanup.append((m, [k for k in keys if rule_set_of(k) in live_rules and rule_set_of(k) not in new_rules]))
    return cleanup


_DELTA_MAPS = {"endpoints": ("ks_endpoints", "endpoints_tag"), "dns": ("ks_dns", "dns_tag")}


def _write_delta(maps: Mapping[str, BpfMap], step: Step, read: _Read, slot: int) -> None:
    """PATH_DELTA: add and delete endpoint and DNS keys in place under the live tags, then
    rewrite the live config slot (bookkeeping only). Deleted keys go at once: a packet that
    finds one missing is judged by the new set. On failure what was done is undone (best
    effort; the next write compares with the maps again) and the error raised."""
    undo: list[tuple[BpfMap, list[bytes], list[bytes]]] = []  # (map, added, deleted)
    try:
        for part, (add, remove) in step.delta.items():
            name, tag_field = _DELTA_MAPS[part]
            m, tag = maps[name], getattr(step.config, tag_field)
            existing = read.endpoint_keys if part == "endpoints" else read.dns_keys
            m.delete_many([k for k in existing or () if key_tag(k) != tag])  # left by a write that died
            added, deleted = [tagged(tag, k) for k in add], [tagged(tag, k) for k in remove]
            undo.append((m, added, deleted))
            m.delete_many(deleted)
            m.update_many(dict.fromkeys(added, b"\1"))
        maps["ks_config"].update(struct.pack("<I", slot), step.config.pack())
    except OSError:
        for m, added, deleted in reversed(undo):
            try:
                m.delete_many(added)
                m.update_many(dict.fromkeys(deleted, b"\1"))
            except OSError:
                pass
        raise


def _write_one_cgroup(maps: Mapping[str, BpfMap], step: Step, want: Version, held: Held, read: _Read,
                      slot: int, hint: CgroupWant | None) -> tuple[list[tuple[BpfMap, list[bytes]]], frozenset[int]]:
    """PATH_ONE_CGROUP: the one exemption's rules under a fresh rule set id (referenced by
    nothing yet), then its ks_cgroups element replaced, inserted or deleted under the live
    tag (one atomic element update), then the live config slot rewritten (bookkeeping only).
    Returns what to delete after a grace period: the old rule set's keys when `hint` (what
    the last write of this process wanted for that cgroup) is verifiably what the map holds,
    else the old rule set id, whose keys a sweep of ks_ports and ks_nets finds."""
    assert want.cgroups is not None and held.cgroups is not None and step.cgroup is not None
    cfg, cid = step.config, step.cgroup
    cgm, ports, nets = maps["ks_cgroups"], maps["ks_ports"], maps["ks_nets"]
    w, raw = want.cgroups.get(cid), held.cgroups.get(cid)
    old = CgroupEntry.unpack(raw) if raw is not None else None
    key = cgroup_key(cid, cfg.cgroups_tag)
    cgm.delete_many([k for k in read.cgroup_items or {}  # left by a write that died
                     if k != RESERVE_KEY and struct.unpack(CGROUP_KEY_FMT, k)[1] != cfg.cgroups_tag])
    rule_set = step.exemption_rules.get(cid, 0)
    fresh = w is not None and w.rules is not None and (old is None or rule_set != old.rules)
    new_ports: list[bytes] = []
    new_nets: list[bytes] = []
    touched = False
    try:
        if fresh:
            assert w is not None and w.rules is not None
            cgm.update(RESERVE_KEY, CgroupEntry(cfg.next_rules).pack())
            new_ports, new_nets = rule_keys(w.rules, rule_set)
            ports.update_many(dict.fromkeys(new_ports, b"\1"))
            nets.update_many(dict.fromkeys(new_nets, b"\1"))
        touched = True
        if w is None:
            cgm.delete(key)
        else:
            cgm.update(key, w.entry(rule_set).pack())
        maps["ks_config"].update(struct.pack("<I", slot), cfg.pack())
    except OSError:
        try:
            if touched:
                if old is None:
                    cgm.delete(key)
                else:
                    cgm.update(key, old.pack())
            ports.delete_many(new_ports)
            nets.delete_many(new_nets)
        except OSError:
            pass
        raise
    if old is None or not old.rules or (w is not None and old.rules == rule_set):
        return [], frozenset()
    if hint is not None and hint.rules is not None and hint.written_as(raw):
        p, n = rule_keys(hint.rules, old.rules)
        return [(ports, p), (nets, n)], frozenset()
    return [], frozenset({old.rules})


def _sweep_rule_sets(maps: Mapping[str, BpfMap], rule_sets: frozenset[int]) -> None:
    """Delete every ks_ports and ks_nets key of these rule sets."""
    for name in ("ks_ports", "ks_nets"):
        m = maps[name]
        m.delete_many([k for k in m.keys() if rule_set_of(k) in rule_sets])


_NORMALIZED: dict[str, str] = {}  # policy cgroup path -> normalize_cgroup(path)


def _normalized(path: str) -> str | None:
    """normalize_cgroup(path), memoized; None for an invalid path."""
    rel = _NORMALIZED.get(path)
    if rel is None:
        try:
            rel = normalize_cgroup(path)
        except ValueError:
            return None
        if len(_NORMALIZED) > 4 * MAX_CGROUPS:
            _NORMALIZED.clear()
        _NORMALIZED[path] = rel
    return rel


def resolve_cgroups(plan: BpfPlan) -> dict[str, int | None]:
    """Exempt and endpoint cgroup paths -> their ids now (None: not there)."""
    return resolve_paths([e.cgroup for e in plan.exemptions] + list(plan.endpoint_cgroups))


def resolve_paths(paths: list[str]) -> dict[str, int | None]:
    """Cgroup paths -> their ids now (None: not there). A directory holding many of them
    is read once (its entries carry their inode numbers, which are the cgroup ids), the
    others are one stat each."""
    try:
        root = str(cgroup2_mount().resolve())
    except (KsbpfError, OSError):
        return dict.fromkeys(paths)
    out: dict[str, int | None] = {}
    by_parent: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        if path in out:
            continue
        out[path] = None
        rel = _normalized(path)
        if rel is None:
            continue
        parent, _, name = rel.rpartition("/")
        by_parent.setdefault(parent if name else "\0root", []).append((path, name))
    for parent, children in by_parent.items():
        where = root if parent in ("", "\0root") else f"{root}/{parent}"
        if len(children) >= 16:
            try:
                with os.scandir(where) as it:
                    found = {e.name: e for e in it}
            except OSError:
                found = {}
            for path, name in children:
                e = found.get(name)
                if e is not None and e.is_dir(follow_symlinks=False):
                    out[path] = e.inode()
            continue
        # One stat, not cgroup_dir's realpath: a normalized path has no '..', and cgroupfs
        # has no symlinks, so the join cannot leave the mount.
        for path, name in children:
            try:
                st = os.stat(f"{where}/{name}" if name else where)
                out[path] = st.st_ino if stat.S_ISDIR(st.st_mode) else None
            except OSError:
                pass
    return out


# =========================================================================== the layer


@dataclass
class _Pending:
    """Deletions a deferred write left for after a grace period."""

    gen: Generation
    entries: list[tuple[str, list[bytes]]]  # (map name, keys)
    sweep: frozenset[int] = frozenset()  # rule sets whose every ks_ports / ks_nets key goes


@dataclass
class BpfLayer:
    """The cgroup-bpf enforcement layer of one ksbpf instance.

    `instance` names the pins and lets the layer recognise its own programs; `netns` is
    the network namespace whose packets it judges (None: the caller's). Every method
    works from a process that did not load the programs (state lives in the kernel).
    """

    instance: str
    kernel_source: str | None = None
    netns: str | None = None
    # "auto" probes the kernel; "helper" / "sk_storage" force a netns mode (tests).
    netns_mode: str = "auto"
    # The policy's [bpf] cgroup, where its programs are attached: looked at first when a
    # process that applied nothing (ksctl without the daemon) finds them, before a walk
    # of the whole cgroup tree (tens of thousands of cgroups on a busy host or the bench).
    cgroup_hint: str | None = None
    # Bytes of the drop-event ring buffer (a power of two, at least a page).
    events_bytes: int = EVENTS_BYTES
    last_apply: ApplyStats | None = field(default=None, init=False)
    _policy: Policy | None = field(default=None, init=False, repr=False)
    _cgroup_cache: dict[int, tuple[Path, ...]] = field(default_factory=dict, init=False, repr=False)
    # What update_exemptions(defer_cleanup=True) left to delete after a grace period.
    # Every write runs it first (_finish_cleanup).
    _pending: list[_Pending] = field(default_factory=list, init=False, repr=False)
    # (generation dir, cgroup id -> want) of the last write: see _remember.
    _written: tuple[Path, dict[int, CgroupWant]] | None = field(default=None, init=False, repr=False)
    last_step: Step | None = field(default=None, init=False, repr=False)  # of the last write
    # (generation dir, its live config) as the last write of this process left it, and the
    # exemptions that write was given: change_exemptions trusts the maps to hold those
    # while the live config is still that one (no other writer came between).
    _base: tuple[Path, Config] | None = field(default=None, init=False, repr=False)
    _index: ExemptionIndex | None = field(default=None, init=False, repr=False)
    # Why the last change_exemptions wrote the whole policy ("" : it did not).
    last_fallback: str = field(default="", init=False, repr=False)

    name = "bpf"

    def __post_init__(self) -> None:
        if not _INSTANCE_RE.match(self.instance) or self.instance in (".", ".."):
            raise BpfError(f"invalid instance name {self.instance!r} (1-64 of A-Z a-z 0-9 _ . -)")
        if self.netns_mode not in ("auto", "helper", "sk_storage"):
            raise BpfError(f"unknown netns mode {self.netns_mode!r}")
        check_events_bytes(self.events_bytes)

    @property
    def dir(self) -> Path:
        return PIN_ROOT / self.instance

    # ------------------------------------------------------------------ support

    def is_supported(self) -> tuple[bool, str]:
        for name, ok, detail in environment_checks():
            if not ok:
                return False, f"{name}: {detail}"
        lookup = headers.resolve_kernel_source(self.kernel_source)
        if lookup.source is None:
            return False, lookup.explain()
        mode = self._netns_mode()
        return True, f"BCC with headers {lookup.source.describe()}; netns by {mode}"

    def _netns_mode(self) -> str:
        if self.netns_mode != "auto":
            return self.netns_mode
        try:
            return "helper" if probe_netns_cookie_helper() else "sk_storage"
        except OSError as e:
            raise BpfError(f"cannot load BPF programs: {os_reason(e)}") from None

    def _source(self, policy: Policy | None) -> headers.KernelSource:
        setting = self.kernel_source or (policy.bpf.kernel_source if policy else None)
        lookup = headers.resolve_kernel_source(setting)
        if lookup.source is None:
            raise BpfError(
                f"cannot compile: {lookup.explain()}. Install the running kernel's headers, run "
                f"`ksctl doctor --prepare-headers {headers.DEFAULT_HEADERS_DIR}`, or set [bpf] kernel_source"
            )
        return lookup.source

    # ------------------------------------------------------------------ apply

    def apply(self, policy: Policy, plan: BpfPlan | None = None) -> ApplyStats:
        """Enforce `policy`. When its programs would be built exactly as the live
        generation's (build_digest) and attach to the same cgroup, the live generation's
        maps are updated in place, with no compile, one whole version at a time; the same
        policy again writes nothing but repairs drift (tunnel ifindexes, cgroup ids, a
        detached program). Otherwise a new generation is compiled, loaded, filled and
        attached, replacing the earlier one (atomically where the kernel can). On failure
        the earlier state stays in force and BpfError says why. `plan`: render(policy),
        if the caller has it."""
        try:
            return self._apply(policy, plan)
        except OSError as e:
            # An environment error no step named (a read-only bpffs, EPERM from bpf(2), ...)
            raise BpfError(os_reason(e)) from None

    def _apply(self, policy: Policy, plan: BpfPlan | None) -> ApplyStats:
        t0 = time.monotonic()
        self._index = None
        target = self._cgroup(policy.bpf.cgroup)
        source = self._source(policy)
        plan = plan if plan is not None else render(policy)  # the engine checked it already
        check_capacity(plan)
        cookie = self._cookie()
        mode = self._netns_mode()
        bpffs.ensure_bpffs(BPFFS)
        with self._locked():
            self._finish_cleanup()
            pins_kept = self._check_instance_maps(mode)
            target_id = cgroup_id(target)
            previous = self._attached(extra=[target])
            live = self._reusable(previous, target_id) if pins_kept else None
            capacity = live[0].capacity() if live else None
            if capacity is None or not capacity.holds(plan):
                capacity = Capacity.for_plan(plan)
            nft, nft_why = nft_events_build()
            flags = cflags(mode, self.dir, capacity, self.events_bytes, nft, probe_sock_task_helpers())
            header = Config(cookie, 0, target_id, plan.flags, plan.endpoint_mark, self.instance,
                            build=build_digest(_source_dir(), flags, source, mode))
            if live is not None and live[1].build == header.build:
                gen = live[0]
                step = self._update(gen, plan, replace(header, generation=gen.number))
                writes = step.describe()
                changed = step.changed + tuple(f"attached {kind}" for kind in self._reattach(gen, target))
                self._retire(keep=gen.number, cgroups=[target])
                how = "in place" if changed else "unchanged"
                load, compiled = LoadStats.nothing(mode), False
            else:
                self._sweep_unattached()
                number = 1 + max([g.number for g in self._generations()] + [a.generation for a in previous] + [0])
                gen = Generation(number, self.dir / f"g{number}")
                load = _run_loader(source, mode, flags, gen.path, nft, nft_why)
                try:
                    self._fill(gen, plan, replace(header, generation=number))
                    how = self._attach(gen, target, previous)
                except BaseException:
                    self._discard(gen, target)
                    raise
                self._retire(keep=number, cgroups=[target])
                changed, compiled, writes = (), True, ()
        self._policy = policy
        self._index = ExemptionIndex.build(policy.exemptions, plan.exemptions)
        self.last_apply = ApplyStats(gen.number, load, time.monotonic() - t0, how, _rss_kb(), compiled, changed,
                                     writes)
        return self.last_apply

    def _reusable(self, attached: list[Attached], target_id: int) -> tuple[Generation, Config] | None:
        """The live generation and its live version, if it may take a new policy in place:
        the newest generation with a program attached (the newest of all when someone
        detached everything), ours, built for the target cgroup, both programs pinned.
        Whether its build fits the policy is apply's to judge."""
        gens = self._generations()
        on = {a.generation for a in attached}
        candidates = [g for g in gens if g.number in on] or gens
        if not candidates:
            return None
        gen = candidates[-1]
        cfg = gen.config()
        if cfg is None or cfg.version == 0 or cfg.instance != self.instance or cfg.cgroup_id != target_id:
            return None
        if any(gen.prog_id(kind) is None for kind in PROGS):
            return None
        return gen, cfg

    def _version(self, plan: BpfPlan, header: Config) -> Version:
        return Version(header=header, endpoints=plan.endpoints, dns=plan.dns, lan=plan.lan,
                       cgroups=cgroup_wants(plan, resolve_cgroups(plan)),
                       tunnels=frozenset(self._tunnel_ifindexes(plan.tunnel_patterns)))

    def _update(self, gen: Generation, plan: BpfPlan, header: Config) -> Step:
        version = self._version(plan, header)
        try:
            self.last_step = self._write(gen, version)
            return self.last_step
        except OSError as e:
            raise BpfError(f"updating generation {gen.number} in place: {e}") from None

    def _cgroup(self, path: str) -> Path:
        try:
            d = cgroup_dir(path)
        except KsbpfError as e:
            raise BpfError(f"[bpf] cgroup: {e}") from None
        if not d.is_dir():
            raise BpfError(f"[bpf] cgroup {path!r}: {d} does not exist")
        return d

    def _cookie(self) -> int:
        try:
            return netns_cookie(self.netns)
        except OSError as e:
            raise BpfError(f"cannot read the netns cookie of {self.netns or 'this netns'}: {e.strerror}") from None
        except KsbpfError as e:
            raise BpfError(str(e)) from None

    @contextmanager
    def _locked(self, create: bool = True) -> Iterator[None]:
        """One writer per instance (daemon and ksctl may both act): flock on the pin dir."""
        try:
            if create:
                self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BpfError(f"instance {self.instance!r} has no loaded programs (apply a policy first)") from None
        except OSError as e:
            raise BpfError(f"cannot use {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _check_instance_maps(self, mode: str) -> bool:
        """A pinned map from an older, incompatible build would be reused blindly by BCC:
        unpin it. True when every instance map is pinned and fits (the live generation's
        programs use those very maps, so it may be reused)."""
        wanted = {
            DROPS_PIN: (MAP_PERCPU_HASH, struct.calcsize(DROP_KEY_FMT), struct.calcsize(DROP_VAL_FMT), None),
            OWNERS_PIN: (MAP_SK_STORAGE, 4, struct.calcsize(OWNER_FMT), None),
            EVENTS_PIN: (MAP_RINGBUF, 0, 0, self.events_bytes),
            EVENTS_LOST_PIN: (MAP_PERCPU_ARRAY, 4, 8, 1),
            EVENTS_RATE_PIN: (MAP_LRU_HASH, struct.calcsize(RATE_KEY_FMT), struct.calcsize(RATE_FMT), EVENTS_RATE_KEYS),
        }
        legacy = self.dir / SK_NETNS_PIN  # replaced by the owner records, which carry the netns
        if legacy.exists():
            legacy.unlink()
        kept = True
        for name, (mtype, ks, vs, entries) in wanted.items():
            path = self.dir / name
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

    def _generations(self) -> list[Generation]:
        gens = []
        try:
            entries = list(self.dir.iterdir())
        except OSError:
            return []
        for p in entries:
            if p.is_dir() and re.fullmatch(r"g\d+", p.name):
                gens.append(Generation(int(p.name[1:]), p))
        return sorted(gens, key=lambda g: g.number)

    def _cgroup_by_id(self, cg_id: int, hints: Iterable[Path] = ()) -> Path | None:
        """The cgroup directory with this id: the hints, the last answer and the cgroup2
        root (production attaches there) first; a walk of the whole tree last."""
        try:
            mount = cgroup2_mount()
        except KsbpfError:
            return None
        for h in [*hints, *self._cgroup_cache.get(cg_id, ()), mount]:
            try:
                if cgroup_id(h) == cg_id:
                    self._cgroup_cache[cg_id] = (h,)
                    return h
            except OSError:
                continue
        for rel, i in ids_by_path(mount).items():
            if i == cg_id:
                found = cgroup_dir(rel, mount)
                self._cgroup_cache[cg_id] = (found,)
                return found
        return None

    def _policy_cgroups(self) -> list[Path]:
        """The attach cgroups the last applied policy and the hint name."""
        out = []
        for rel in (self._policy.bpf.cgroup if self._policy is not None else None, self.cgroup_hint):
            if rel is None:
                continue
            try:
                d = cgroup_dir(rel)
            except KsbpfError:
                continue
            if d not in out:
                out.append(d)
        return out

    def _candidate_cgroups(self, extra: Iterable[Path] = ()) -> list[Path]:
        """Cgroups our programs may be attached to: the given ones, the last policy's,
        and those the pinned generations recorded."""
        out: list[Path] = []
        hints = [*extra, *self._policy_cgroups()]
        for h in hints:
            if h not in out and h.is_dir():
                out.append(h)
        for g in self._generations():
            cfg = g.config()
            if cfg is None:
                continue
            p = self._cgroup_by_id(cfg.cgroup_id, out)
            if p is not None and p not in out:
                out.append(p)
        return out

    def _attached(self, extra: Iterable[Path] = ()) -> list[Attached]:
        """Our programs attached to any candidate cgroup, recognised by their ks_config."""
        found: list[Attached] = []
        for cg in self._candidate_cgroups(extra):
            try:
                fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                for kind, atype in ATTACH_TYPES.items():
                    for pid in prog_query(fd, atype):
                        cfg = _prog_config(pid)
                        if cfg is not None and cfg.instance == self.instance:
                            found.append(Attached(kind, pid, cfg.generation, cg))
            except OSError as e:
                raise BpfError(f"cannot query programs on {cg}: {e.strerror}") from None
            finally:
                os.close(fd)
        return found

    def _sweep_unattached(self) -> None:
        """Generations pinned but attached nowhere (an apply that died half-way)."""
        attached = {(a.generation, a.kind) for a in self._attached()}
        for g in self._generations():
            if not any((g.number, k) in attached for k in PROGS):
                shutil.rmtree(g.path, ignore_errors=True)

    def _fill(self, gen: Generation, plan: BpfPlan, header: Config) -> None:
        try:
            with BpfMap.pinned(self.dir / DROPS_PIN) as m:
                zero = struct.pack(DROP_VAL_FMT, 0, 0)
                for r in DROP_REASONS:
                    try:
                        m.update(struct.pack(DROP_KEY_FMT, REASON_NUMBERS[r], 0, 0), zero, BPF_NOEXIST)
                    except FileExistsError:
                        pass
            self.last_step = self._write(gen, self._version(plan, header))
        except OSError as e:
            raise BpfError(f"filling generation {gen.number}: {e}") from None

    def _write(self, gen: Generation, want: Version, defer: bool = False) -> Step:
        """Bring a generation's maps to `want` (plan_step chooses how). Versioned: the next
        version is written beside the live one (what changed under new tags and rule set
        ids, in the other tunnel bank), then ks_active flips to it in one u32 write, then,
        after a grace period, what only the old version used is deleted. In place (delta,
        one cgroup): only what changed is written, under the live tags. A failure leaves the
        live version in force: a versioned write's entries are unreferenced (and cleared by
        the next write), an in-place one undoes itself. `defer`: the grace period and what
        it guards are left to _finish_cleanup (finish_cleanup() or the next write). Returns
        the step taken."""
        self._base = None
        with _open_maps(gen) as maps:
            found = _active_config(maps["ks_active"], maps["ks_config"])
            live = found if found is not None and found[1].version else None  # version 0: never filled
            old = live[1] if live else None
            masks = _tunnel_masks(maps)
            read = _read(maps, want, old)
            held = read.held(old)
            step = plan_step(old, _tunnels_of(masks, old.tunnel_bank) if old else frozenset(), want, held)
            if old is not None and not step.changed:
                self._remember(gen, want)
                self._base = (gen.path, old)
                return step
            cfg = step.config
            cleanups: list[tuple[BpfMap, list[bytes]]] = []
            sweep: frozenset[int] = frozenset()
            if step.path == PATH_DELTA:
                assert live is not None
                _write_delta(maps, step, read, live[0])
                self._remember(gen, want)
                self._base = (gen.path, cfg)
                return step
            if step.path == PATH_ONE_CGROUP:
                assert live is not None and want.cgroups is not None and step.cgroup is not None
                hint = self._written[1].get(step.cgroup) if self._written and self._written[0] == gen.path else None
                cleanups, sweep = _write_one_cgroup(maps, step, want, held, read, live[0], hint)
                self._remember(gen, want)
                self._base = (gen.path, cfg)
                if not cleanups and not sweep:
                    return step  # nothing only the old entry used: no grace period to wait for
            else:
                if "endpoints" in step.changed:
                    assert want.endpoints is not None
                    cleanups += _write_tagged(maps["ks_endpoints"], want.endpoints, cfg.endpoints_tag,
                                              old.endpoints_tag if old else None, read.endpoint_keys)
                if "dns" in step.changed:
                    assert want.dns is not None
                    cleanups += _write_tagged(maps["ks_dns"], want.dns, cfg.dns_tag, old.dns_tag if old else None,
                                              read.dns_keys)
                if "lan" in step.changed or "cgroups" in step.changed:
                    cleanups += _write_rules(maps, step, want, old, read.cgroup_items)
                if "tunnels" in step.changed:
                    assert want.tunnels is not None
                    _write_tunnels(maps, masks, cfg.tunnel_bank, want.tunnels)
                slot = 1 - live[0] if live else 0
                maps["ks_config"].update(struct.pack("<I", slot), cfg.pack())
                maps["ks_active"].update(_KEY0, struct.pack("<I", slot))
                self._remember(gen, want)
                self._base = (gen.path, cfg)
            self._clean_after(gen, maps, cleanups, sweep, defer if live is not None else None)
        return step

    def _clean_after(self, gen: Generation, maps: Mapping[str, BpfMap], cleanups: list[tuple[BpfMap, list[bytes]]],
                     sweep: frozenset[int], defer: bool | None) -> None:
        """Delete what only the old version used, after a grace period (`defer`: leave it
        to _finish_cleanup; None: no version was live, nothing to wait for)."""
        if defer:
            # Also when there is nothing to delete: the next flip rewrites the config slot
            # packets may still be reading until a grace period has passed.
            names = {id(m): name for name, m in maps.items()}
            self._pending.append(_Pending(gen, [(names[id(m)], keys) for m, keys in cleanups], sweep))
            return
        if defer is not None:
            rcu_grace_period()
        for m, keys in cleanups:
            m.delete_many(keys)
        if sweep:
            _sweep_rule_sets(maps, sweep)

    def _remember(self, gen: Generation, want: Version) -> None:
        """What the maps now hold for each cgroup id, as a hint for the next one-cgroup
        write (which verifies it against the entry's digest before trusting it)."""
        if want.cgroups is not None:
            self._written = (gen.path, dict(want.cgroups))

    def _finish_cleanup(self) -> None:
        """Delete what deferred writes left, after a grace period from now (which also
        covers every run that began before their flips). Under the instance lock."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rcu_grace_period()
        for p in pending:
            try:
                with _open_maps(p.gen) as maps:
                    for name, keys in p.entries:
                        maps[name].delete_many(keys)
                    if p.sweep:
                        _sweep_rule_sets(maps, p.sweep)
            except OSError:
                # The generation was replaced or removed meanwhile. Entries left under an
                # old tag are read by no version and the next write clears them.
                pass

    def finish_cleanup(self) -> None:
        """Run what update_exemptions(defer_cleanup=True) left (ksbpfd: once the reply is
        out, so the grace period is not on the request's path)."""
        if self._pending:
            with self._locked(create=False):
                self._finish_cleanup()

    def _attach(self, gen: Generation, target: Path, previous: list[Attached]) -> str:
        """Swap the new generation in for the previous one. Returns how: "first" (nothing
        to replace), "atomic" (BPF_F_REPLACE in place) or "make-before-break"."""
        how = "atomic" if previous else "first"
        cg_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Egress first: it is the enforcing half; sock_create only adds marks.
            for kind in ("egress", "sock_create"):
                new_fd = gen.prog_fd(kind)
                try:
                    old = next((a for a in previous if a.kind == kind and a.cgroup == target), None)
                    if old is not None and self._replace(new_fd, cg_fd, kind, old):
                        continue
                    if previous:
                        # Attach cgroup changed, old kernel, or old program gone: the old one
                        # stays until _retire, so both run meanwhile and nothing leaks.
                        how = "make-before-break"
                    prog_attach(new_fd, cg_fd, ATTACH_TYPES[kind])
                except OSError as e:
                    raise BpfError(f"attaching {kind} to {target}: {e.strerror}") from None
                finally:
                    os.close(new_fd)
        finally:
            os.close(cg_fd)
        return how

    @staticmethod
    def _replace(new_fd: int, cg_fd: int, kind: str, old: Attached) -> bool:
        try:
            old_fd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, old.prog_id, "open old program")
        except OSError:
            return False
        try:
            prog_attach(new_fd, cg_fd, ATTACH_TYPES[kind], replace_fd=old_fd)
            return True
        except OSError:
            return False
        finally:
            os.close(old_fd)

    def _detach(self, prog_id: int, kind: str, cgroup: Path) -> None:
        try:
            pfd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, prog_id, "open program")
        except OSError:
            return
        try:
            cfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(pfd)
            return
        try:
            prog_detach(pfd, cfd, ATTACH_TYPES[kind])
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise BpfError(f"detaching {kind} #{prog_id} from {cgroup}: {e.strerror}") from None
        finally:
            os.close(pfd)
            os.close(cfd)

    def _discard(self, gen: Generation, target: Path) -> None:
        for kind in PROGS:
            pid = gen.prog_id(kind)
            if pid is not None:
                self._detach(pid, kind, target)
        shutil.rmtree(gen.path, ignore_errors=True)

    def _retire(self, keep: int, cgroups: list[Path]) -> None:
        """Detach and unpin every generation but `keep`."""
        for a in self._attached(extra=cgroups):
            if a.generation != keep:
                self._detach(a.prog_id, a.kind, a.cgroup)
        for g in self._generations():
            if g.number != keep:
                shutil.rmtree(g.path, ignore_errors=True)

    # ------------------------------------------------------------------ runtime updates

    def _live(self) -> list[Generation]:
        gens = self._generations()
        if not gens:
            raise BpfError(f"instance {self.instance!r} has no loaded programs (apply a policy first)")
        return gens

    def _tunnel_ifindexes(self, patterns: tuple[str, ...]) -> list[int]:
        try:
            with netns(self.netns):
                links = socket.if_nameindex()
        except (OSError, KsbpfError) as e:
            raise BpfError(f"cannot list links in {self.netns or 'this netns'}: {e}") from None
        return sorted(i for i, name in links if interface_matches(name, patterns))

    def update_tunnel_ifindexes(self, policy: Policy | None = None,
                                ifindexes: Iterable[int] | None = None) -> tuple[int, ...]:
        """Point the tunnel map at the current tunnel links (call on netlink link events):
        `ifindexes` as given, or the links in the netns matching the policy's tunnel
        interfaces (the last applied policy when None). Returns the ifindexes set.
        The live version's tunnel bank changes in place: each packet looks up one
        ifindex, so it sees the link as a tunnel or not, never half of it."""
        if ifindexes is None:
            p = policy or self._policy
            if p is None:
                raise BpfError("update_tunnel_ifindexes needs a policy or explicit ifindexes")
            ifindexes = self._tunnel_ifindexes(p.tunnel.interfaces)
        wanted = frozenset(ifindexes)
        with self._locked(create=False):
            for g in self._live():
                try:
                    with _open_maps(g) as maps:
                        live = _active_config(maps["ks_active"], maps["ks_config"])
                        if live is not None:
                            _write_tunnels(maps, _tunnel_masks(maps), live[1].tunnel_bank, wanted)
                except OSError as e:
                    raise BpfError(f"updating tunnels of generation {g.number}: {e}") from None
        return tuple(sorted(wanted))

    def update_exemptions(self, policy: Policy, defer_cleanup: bool = False) -> dict[str, int | None]:
        """Re-resolve exempt and endpoint cgroups to ids (call when cgroups come and go,
        and after exemptions change at run time). A cgroup recreated under the same path
        gets a new id and keeps its exemption. Only exemptions and endpoint cgroups are
        taken from `policy`; any other change needs apply(). One cgroup's entry changed
        (`ksctl exempt` / `unexempt`) is replaced in place; more are written as a new
        version beside the live one: a packet sees the old exemptions or the new, never a
        mix (last_step says which). Returns path -> id (None: not there now).
        `defer_cleanup`: what only the old version used is deleted by finish_cleanup() (or
        the next write) after the grace period, not before returning."""
        plan = render(policy, sets=False)
        check_capacity(plan)
        self._index = None
        with self._locked(create=False):
            self._finish_cleanup()
            resolved = resolve_cgroups(plan)
            for g in self._live():
                try:
                    self.last_step = self._write(g, Version(cgroups=cgroup_wants(plan, resolved)), defer_cleanup)
                except OSError as e:
                    raise BpfError(f"updating exemptions of generation {g.number}: {e}") from None
        if self._policy is not None:
            self._policy = self._policy.with_exemptions(policy.exemptions)
        self._index = ExemptionIndex.build(policy.exemptions, plan.exemptions)
        return resolved

    def change_exemptions(self, before: Policy, after: Policy, defer_cleanup: bool = False) -> dict[str, int | None]:
        """update_exemptions(after) for a run-time change from `before` (what this layer
        wrote last), in O(changed): when exactly one exemption path differs and its cgroup
        is the only one whose entry changes, only that path is resolved, its live entry
        looked up and replaced in place (PATH_ONE_CGROUP: its rules under a fresh rule set
        id, the old ones after a grace period, `defer_cleanup` as in update_exemptions).
        Otherwise, or when anything is uncertain (another writer came between, the live
        entry is not what `before` says, marks of other exemptions would move, ...), it is
        update_exemptions(after); last_fallback says why. So is the same policy again
        (re-exempting a recreated cgroup follows its new id). Returns path -> id of the
        paths it resolved (all of them when it fell back). A policy beyond capacity raises
        BpfError before anything changes, as update_exemptions does."""
        picked = select_change(before, after, self._index)
        if picked is None:
            # The same exemptions again: `ksctl exempt` of a recreated cgroup, to follow its
            # new id. Which path moved is unknown here, so all are resolved.
            picked = "nothing differs (all cgroups re-resolved)"
        if isinstance(picked, str):
            return self._fall_back(after, defer_cleanup, picked)
        check_counts(picked.cgroups, picked.ports, picked.nets)
        with self._locked(create=False):
            self._finish_cleanup()
            try:
                outcome = self._change_one(picked, after, defer_cleanup)
            except OSError as e:
                self._base = None
                raise BpfError(f"updating exemptions: {e}") from None
        if isinstance(outcome, str):
            return self._fall_back(after, defer_cleanup, outcome)
        self.last_fallback = ""
        self._changed(after, picked)
        return outcome

    def _fall_back(self, after: Policy, defer_cleanup: bool, why: str) -> dict[str, int | None]:
        resolved = self.update_exemptions(after, defer_cleanup)
        self.last_fallback = why
        return resolved

    def _changed(self, after: Policy, change: ExemptionChange) -> None:
        """The bookkeeping update_exemptions(after) would leave."""
        if self._policy is not None:
            self._policy = self._policy.with_exemptions(after.exemptions)
        if self._index is not None:
            self._index.apply(change, after.exemptions)

    def _change_one(self, c: ExemptionChange, after: Policy, defer: bool) -> dict[str, int | None] | str:
        """The in-place half of change_exemptions, under the lock; a string: why not."""
        gens = self._generations()
        if len(gens) != 1:
            return f"{len(gens)} generations"
        gen = gens[0]
        if self._base is None or self._base[0] != gen.path:
            return "no write of this layer to the live generation"
        with _open_maps(gen) as maps:
            found = _active_config(maps["ks_active"], maps["ks_config"])
            if found is None or found[1] != self._base[1]:
                return "the live version is not the one this layer wrote last"
            slot, live = found
            cid = resolve_paths([c.path])[c.path]
            if cid is None:
                return f"cgroup {c.path!r} is not there"
            endpoint = c.path in after.tunnel.endpoint_cgroups
            mark = endpoint_cgroup_mark(after)
            old_w = change_want(c.old_rules, endpoint, mark)
            new_w = change_want(c.new_rules, endpoint, mark)
            cgm = maps["ks_cgroups"]
            raw = cgm.lookup(cgroup_key(cid, live.cgroups_tag))
            if old_w is None and raw is not None:
                return f"cgroup id {cid} has an entry `before` does not explain (shared with another path?)"
            if old_w is not None and not old_w.written_as(raw):
                return f"the live entry of cgroup id {cid} is not what `before` says"
            resolved: dict[str, int | None] = {c.path: cid}
            if (new_w is None and raw is None) or (new_w is not None and new_w.written_as(raw)):
                self.last_step = None  # the same entry: nothing to write
                self._base = (gen.path, live)
                return resolved
            reserve = cgm.lookup(RESERVE_KEY)
            reserved = CgroupEntry.unpack(reserve).rules if reserve is not None else 0
            d = live.digests
            cfg = replace(live, version=live.version + 1,
                          digests=(d[0], d[1], d[2], cgroups_digest_changed(d[3], cid, old_w, new_w)))
            step = one_cgroup_step(cfg, max(live.next_rules, reserved), cid, new_w, raw)
            self._base = None
            cleanups, sweep = _write_one_cgroup(maps, step, Version(cgroups={cid: new_w} if new_w else {}),
                                                Held(cgroups={cid: raw} if raw is not None else {}), _Read(), slot,
                                                old_w)
            self.last_step = step
            self._base = (gen.path, step.config)
            if self._written is not None and self._written[0] == gen.path:
                if new_w is None:
                    self._written[1].pop(cid, None)
                else:
                    self._written[1][cid] = new_w
            if cleanups or sweep:
                self._clean_after(gen, maps, cleanups, sweep, defer)
        return resolved

    # ------------------------------------------------------------------ drift, status, reset

    def _reattach(self, gen: Generation, target: Path) -> list[str]:
        """Attach the generation's programs where they are missing from `target`."""
        repaired: list[str] = []
        attached = {(a.kind, a.prog_id) for a in self._attached(extra=[target])}
        for kind in PROGS:
            pid = gen.prog_id(kind)
            if pid is None or (kind, pid) in attached:
                continue
            try:
                pfd = gen.prog_fd(kind)
            except OSError as e:
                raise BpfError(f"re-attaching {kind}: {e.strerror}") from None
            try:
                cfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    prog_attach(pfd, cfd, ATTACH_TYPES[kind])
                    repaired.append(kind)
                finally:
                    os.close(cfd)
            except OSError as e:
                raise BpfError(f"re-attaching {kind}: {e.strerror}") from None
            finally:
                os.close(pfd)
        return repaired

    def ensure_attached(self) -> list[str]:
        """Re-attach the pinned generation where someone detached it (no compile needed).
        Returns what was repaired, e.g. ["egress"]."""
        with self._locked(create=False):
            gens = self._generations()
            if not gens:
                raise BpfError(f"instance {self.instance!r} has nothing pinned to re-attach; apply instead")
            gen = gens[-1]
            cfg = gen.config()
            target = self._cgroup_by_id(cfg.cgroup_id, self._candidate_cgroups()) if cfg else None
            if target is None:
                raise BpfError(f"the cgroup generation {gen.number} was attached to is gone; apply instead")
            return self._reattach(gen, target)

    def engaged(self) -> bool:
        """Is the newest generation live (a config) and both its programs attached to its
        cgroup? A few syscalls, for the run-time exemption path; status() says more."""
        gens = self._generations()
        if not gens:
            return False
        gen = gens[-1]
        cfg = gen.config()
        if cfg is None:
            return False
        target = self._cgroup_by_id(cfg.cgroup_id, self._policy_cgroups())
        if target is None:
            return False
        try:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            for kind, atype in ATTACH_TYPES.items():
                pid = gen.prog_id(kind)
                if pid is None or pid not in prog_query(fd, atype):
                    return False
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def status(self) -> tuple[bool, str]:
        """(engaged, detail): engaged means bpffs mounted, exactly one pinned generation and
        both its programs attached. Programs of this instance attached without pins (gone,
        or in a bpffs another mount namespace had) are found by asking the kernel."""
        mounted = _bpffs_mounted()
        gens = self._generations() if mounted else []
        try:
            attached = self._attached()
        except BpfError as e:
            return False, str(e)
        if not gens:
            unmounted = "" if mounted else f"bpffs is not mounted at {BPFFS} ({bpffs.what_is_there(BPFFS)})"
            try:
                orphans = attached or self.attached_anywhere(self._policy_cgroups())
            except OSError as e:
                return False, "; ".join(filter(None, (unmounted, f"cannot ask the kernel: {os_reason(e)}")))
            if orphans:
                return False, (f"attached without pins: {describe_attached(orphans)} (still judging packets; no pins "
                               f"under {self.dir}{': ' + unmounted if unmounted else ''}; `ksctl down` detaches "
                               f"them, `ksctl up` replaces them)")
            return False, unmounted or "not loaded"
        gen = gens[-1]
        cfg = gen.config()
        mine = [a for a in attached if a.generation == gen.number]
        others = sorted({a.generation for a in attached if a.generation != gen.number})
        kinds = {a.kind for a in mine}
        where = str(mine[0].cgroup) if mine else (f"cgroup id {cfg.cgroup_id}" if cfg else "?")
        detail = f"generation {gen.number} on {where}"
        if cfg:
            detail += f", version {cfg.version}, netns cookie {cfg.netns_cookie}"
            try:
                with _open_maps(gen) as maps:
                    tunnels = sorted(_tunnels_of(_tunnel_masks(maps), cfg.tunnel_bank))
                    ncg = sum(1 for k in maps["ks_cgroups"].keys()
                              if struct.unpack(CGROUP_KEY_FMT, k)[1] == cfg.cgroups_tag)
                detail += f", tunnel ifindexes {tunnels or 'none (blocking all)'}, {ncg} exempt/endpoint cgroups"
            except OSError:
                pass
        missing = [k for k in PROGS if k not in kinds]
        if missing:
            return False, f"{detail}: {', '.join(missing)} not attached (detached behind our back?)"
        if others or len(gens) > 1:
            return False, f"{detail}: other generations still present {others or [g.number for g in gens[:-1]]}"
        return True, detail

    def counters(self) -> list[tuple[str, int, int, int]]:
        """(reason, cgroup id, packets, bytes) from the pinned drop counters, summed over
        CPUs; cgroup id 0 collects drops after the map filled up."""
        path = self.dir / DROPS_PIN
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

    def events_lost(self) -> int:
        """Drop events the ring buffer had no room for (their packets ride on the next
        event of their key), summed over CPUs; 0 before the first load."""
        path = self.dir / EVENTS_LOST_PIN
        if not path.exists():
            return 0
        try:
            with BpfMap.pinned(path) as m:
                raw = m.lookup(struct.pack("<I", 0))
                return sum(struct.unpack("<Q", v)[0] for v in m.percpu_values(raw)) if raw else 0
        except OSError as e:
            raise BpfError(f"reading {path}: {e}") from None

    def events_detail(self) -> str:
        """Which layers' drops become events: "bpf+nftables", or why nftables' do not."""
        gens = self._generations()
        if not gens:
            return "not loaded"
        if (gens[-1].path / NFT_EVENTS_LINK).exists():
            return "bpf+nftables"
        why = self.last_apply.load.nft_events if self.last_apply is not None else ""
        if not why:
            why = nft_events_build()[1] or "the kfree_skb program is not attached"
        return f"bpf only ({why})"

    def reset(self, cgroup: str | None = None) -> None:
        """Detach every program of this instance and unpin everything it made (counters
        included). The pins are one way to find the programs; the kernel is asked too, so
        programs whose pins are gone (or were in a bpffs private to another mount namespace)
        are found on their cgroup and detached. `cgroup` names one more place to look
        first. BpfError names what is still attached afterwards."""
        extra = []
        if cgroup is not None:
            try:
                extra.append(cgroup_dir(cgroup))
            except KsbpfError:
                pass
        self._base, self._index = None, None
        self._pending = []  # the maps go with their generations
        if not self.dir.exists() and not _bpf_usable():
            return  # bpf(2) is refused here: nothing of ksbpf was attached from here, nothing can be looked for
        with self._locked_if_present():
            for a in self._attached(extra=extra):
                self._detach(a.prog_id, a.kind, a.cgroup)
            if self.dir.exists():
                shutil.rmtree(self.dir, ignore_errors=True)
        self._policy = None
        try:
            for a in self.attached_anywhere(extra, everywhere=True):
                self._detach(a.prog_id, a.kind, a.cgroup)
            left = self.attached_anywhere(extra, everywhere=True)
        except OSError as e:
            raise BpfError(f"cannot ask the kernel for the programs of {self.instance!r}: {os_reason(e)}") from None
        if left:
            raise BpfError(f"still attached after detaching: {describe_attached(left)} (attached by something "
                           f"ksbpf cannot detach, e.g. a bpf_link another process holds)")

    @contextmanager
    def _locked_if_present(self) -> Iterator[None]:
        """The instance lock when the pin directory exists; nothing to lock otherwise
        (and nothing is created: /sys/fs/bpf may not even be a bpffs)."""
        with ExitStack() as stack:
            if self.dir.exists():
                try:
                    stack.enter_context(self._locked(create=False))
                except BpfError:
                    pass  # removed meanwhile
            yield

    def _loaded(self) -> dict[int, Config]:
        """This instance's programs loaded in the kernel however they are held (attached,
        pinned, an open descriptor), by their ks_config: id -> config."""
        out: dict[int, Config] = {}
        for pid in prog_ids():
            cfg = _prog_config(pid)
            if cfg is not None and cfg.instance == self.instance:
                out[pid] = cfg
        return out

    def attached_anywhere(self, first: Iterable[Path] = (), everywhere: bool = False) -> list[Attached]:
        """Where this instance's programs are attached, by asking the kernel, not the pins.
        Nothing of it loaded: [] at once. Else the cgroups in `first` are queried, then
        every cgroup of the cgroup2 tree: always when `everywhere` (a program may sit on
        more than one), else only while a loaded program is not found attached yet (it
        may be loaded but attached nowhere: pinned only, or held by an open descriptor).
        Raises OSError when the kernel refuses the asking."""
        ours = self._loaded()
        if not ours:
            return []
        found: list[Attached] = []
        queried: set[Path] = set()

        def query(cg: Path) -> None:
            queried.add(cg)
            try:
                fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return  # removed meanwhile
            try:
                for kind, atype in ATTACH_TYPES.items():
                    for pid in prog_query(fd, atype):
                        if pid in ours:
                            found.append(Attached(kind, pid, ours[pid].generation, cg))
            finally:
                os.close(fd)

        for cg in first:
            if cg not in queried and cg.is_dir():
                query(cg)
        if everywhere or set(ours) - {a.prog_id for a in found}:
            try:
                mount = cgroup2_mount()
            except KsbpfError:
                return found
            for cg in cgroup_tree(mount):
                if cg not in queried:
                    query(cg)
        return found


def describe_attached(attached: Iterable[Attached]) -> str:
    return ", ".join(f"{PROGS[a.kind]} #{a.prog_id} on {a.cgroup}" for a in attached)


def cgroup_tree(mount: Path) -> Iterator[Path]:
    """Every cgroup directory below `mount` (inclusive), parents first; cgroups removed
    meanwhile are skipped."""
    todo = [mount]
    while todo:
        d = todo.pop()
        yield d
        try:
            with os.scandir(d) as entries:
                todo.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue


def _bpf_usable() -> bool:
    """May this process use bpf(2) at all (not refused by a seccomp filter or missing
    capabilities)?"""
    try:
        next(prog_ids(), None)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOSYS):
            return False
        raise BpfError(f"cannot list BPF programs: {os_reason(e)}") from None
    return True


# =========================================================================== doctor helpers


def environment_checks() -> list[tuple[str, bool, str]]:
    """What BPF needs besides headers, as (check, ok, detail), in dependency order."""
    import importlib.util

    checks: list[tuple[str, bool, str]] = []
    try:
        checks.append(("cgroup2", True, f"mounted at {cgroup2_mount()}"))
    except KsbpfError as e:
        checks.append(("cgroup2", False, str(e)))
    spec = importlib.util.find_spec("bcc")
    checks.append(("bcc", spec is not None,
                   f"python module at {spec.origin}" if spec else
                   "python3-bpfcc is not importable (apt install python3-bpfcc; venv needs --system-site-packages)"))
    checks.append(bpffs_check())
    if os.geteuid() == 0:
        try:
            helper = probe_netns_cookie_helper()
            checks.append(("netns keying", True, "bpf_get_netns_cookie in cgroup_skb" if helper else
                           "per-socket netns record (cgroup_skb lacks bpf_get_netns_cookie before 6.15)"))
        except OSError as e:
            checks.append(("bpf syscall", False, f"loading a probe program failed: {os_reason(e)}"))
    return checks


def bpffs_check() -> tuple[str, bool, str]:
    """Is bpffs at /sys/fs/bpf, with room for pins, or can `ksctl up` mount it here?"""
    if _bpffs_mounted():
        if not os.access(BPFFS, os.W_OK):
            return "bpffs", False, f"mounted at {BPFFS} but not writable (read-only mount): pins cannot be made"
        return "bpffs", True, f"mounted at {BPFFS}"
    ok, why = bpffs.host_mount_namespace()
    if not ok:
        return "bpffs", False, (f"not mounted at {BPFFS} ({bpffs.what_is_there(BPFFS)}), and not mountable from here: {why}; "
                                f"mount it on the host: `{bpffs.HOW_TO_MOUNT}`")
    if not BPFFS.is_dir() and not os.access(BPFFS.parent, os.W_OK):
        return "bpffs", False, (f"not mounted, and {BPFFS} cannot be created ({BPFFS.parent} is read-only): "
                                f"a container needs bpffs mounted at {BPFFS} by its manager or writable API "
                                "file systems (systemd-nspawn: SYSTEMD_NSPAWN_API_VFS_WRITABLE=yes)")
    return "bpffs", True, f"not mounted; `ksctl up` mounts it at {BPFFS} ({why})"


def trial_compile(source: headers.KernelSource, netns_mode: str = "auto") -> LoadStats:
    """Compile and verifier-load the programs without pinning or attaching anything."""
    mode = netns_mode if netns_mode != "auto" else ("helper" if probe_netns_cookie_helper() else "sk_storage")
    nft, why = nft_events_build()
    return _run_loader(source, mode, cflags(mode, None, None, EVENTS_BYTES, nft, probe_sock_task_helpers()), None,
                       nft, why)


if __name__ == "__main__":
    sys.exit(_loader_main())
