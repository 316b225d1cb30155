"""The bpf(2) system call: map access (BpfMap), pinning, attaching, queries, program and
map info, and the few programs loaded by hand (probes, the tp_btf drop-event program)."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ksbpf.linux.libc import libc as _libc

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
_BPF_FUNC_GET_NETNS_COOKIE = 122


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
