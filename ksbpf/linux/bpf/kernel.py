"""BPF objects as the BPF layer uses them, over libbpf's low-level API (ksbpf.linux.libbpf):
map access (BpfMap), the kernel's numbers for program, map and attach types, the RCU
grace period, verifier probes and the tp_btf drop-event program loaded by hand."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import ClassVar

from ksbpf.linux import libbpf
from ksbpf.linux.libbpf import BPF_ANY
from ksbpf.linux.libc import libc

# linux/bpf.h (UAPI: stable numbers)
ATTACH_EGRESS = 1  # BPF_CGROUP_INET_EGRESS
ATTACH_SOCK_CREATE = 2  # BPF_CGROUP_INET_SOCK_CREATE
ATTACH_TYPES = {"egress": ATTACH_EGRESS, "sock_create": ATTACH_SOCK_CREATE}

MAP_PERCPU_HASH = 5
MAP_PERCPU_ARRAY = 6
MAP_LRU_HASH = 9
MAP_SK_STORAGE = 24
MAP_RINGBUF = 27
PROG_CGROUP_SKB = 8
PROG_CGROUP_SOCK = 9
PROG_TRACING = 26
ATTACH_TRACE_RAW_TP = 23  # BPF_TRACE_RAW_TP: tp_btf

_NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "armv7l": 389, "ppc64le": 365, "s390x": 356, "riscv64": 283}
_MEMBARRIER_CMD_GLOBAL = 1
# A batch command the map type does not have: EINVAL, EOPNOTSUPP, or the kernel's ENOTSUPP.
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)
_BPF_FUNC_GET_CURRENT_PID_TGID = 14
_BPF_FUNC_GET_CURRENT_COMM = 16
_BPF_FUNC_GET_NETNS_COOKIE = 122


def rcu_grace_period() -> None:
    """Wait until every BPF program run that started before now has ended: programs run
    under rcu_read_lock, and membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu().
    Where it is missing (nohz_full, unknown arch) a pause stands in; a run takes microseconds."""
    nr = _NR_MEMBARRIER.get(os.uname().machine)
    if nr is not None and libc.syscall(ctypes.c_long(nr), ctypes.c_int(_MEMBARRIER_CMD_GLOBAL),
                                       ctypes.c_uint(0), ctypes.c_int(0)) == 0:
        return
    time.sleep(0.05)


EPERM_HINT = ("ksbpf needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN, and a container must allow the bpf "
              "system call (systemd-nspawn: --system-call-filter=bpf --capability=all; docker: --privileged or a "
              "seccomp profile allowing bpf, with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN)")


def os_reason(e: OSError) -> str:
    """An OSError as a layer's reason: what failed and why, with the fix for EPERM."""
    what = f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    if e.errno == errno.EPERM:
        what += f" ({EPERM_HINT})"
    return what


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class BpfMap:
    """A map opened by fd (pinned path or id), read and written through libbpf."""

    # Elements written (updated or deleted) per map name, by every BpfMap of this process:
    # how tests and benchmarks see that an update is O(changed) without timing it.
    written: ClassVar[Counter[str]] = Counter()
    # Whole-map reads (keys() or items()) and single-key lookups, per map name, likewise.
    read_whole: ClassVar[Counter[str]] = Counter()
    looked_up: ClassVar[Counter[str]] = Counter()

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.info = libbpf.map_info(fd)
        self.percpu = self.info.type in (5, 6, 10)  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
        self.ncpus = _possible_cpus() if self.percpu else 1
        self.value_stride = (self.info.value_size + 7) // 8 * 8 if self.percpu else self.info.value_size

    @classmethod
    def pinned(cls, path: Path | str) -> BpfMap:
        return cls(libbpf.obj_get(path))

    @classmethod
    def by_id(cls, map_id: int) -> BpfMap:
        return cls(libbpf.map_fd_by_id(map_id, f"open map id {map_id}"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.info.key_size:
            raise ValueError(f"map {self.info.name}: key of {len(key)} bytes, map wants {self.info.key_size}")
        return key

    def lookup(self, key: bytes) -> bytes | None:
        """The value; for per-CPU maps, every CPU's value back to back."""
        BpfMap.looked_up[self.info.name] += 1
        return self._lookup(key)

    def _lookup(self, key: bytes) -> bytes | None:
        return libbpf.map_lookup(self.fd, self._key(key), self.value_stride * self.ncpus,
                                 f"lookup in {self.info.name}")

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        BpfMap.written[self.info.name] += 1
        self._update(key, value, flags)

    def _update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        k = self._key(key)
        if self.percpu and len(value) == self.info.value_size:
            value = value.ljust(self.value_stride, b"\0") * self.ncpus
        libbpf.map_update(self.fd, k, value, flags, f"update {self.info.name}")

    def delete(self, key: bytes) -> bool:
        BpfMap.written[self.info.name] += 1
        return self._delete(key)

    def _delete(self, key: bytes) -> bool:
        return libbpf.map_delete(self.fd, self._key(key), f"delete from {self.info.name}")

    def _keys_one_by_one(self) -> list[bytes]:
        out: list[bytes] = []
        key: bytes | None = None
        while (key := libbpf.map_next_key(self.fd, key, self.info.key_size, f"iterate {self.info.name}")) is not None:
            out.append(key)
        return out

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
            n, err = libbpf.map_lookup_batch(self.fd, None if first else tokens[0], tokens[1], keys, values, chunk)
            if err == errno.ENOSPC:  # one hash bucket holds more than `chunk`
                chunk *= 4
                continue
            if first and err in _NO_BATCH:
                return None
            if err not in (0, errno.ENOENT):  # ENOENT: the end, with the last n entries
                raise libbpf.error(err, f"read {self.info.name}")
            kr, vr = keys.raw, values.raw
            out.extend((kr[i * ks:(i + 1) * ks], vr[i * vs:(i + 1) * vs]) for i in range(n))
            if err:
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
                n, err = libbpf.map_update_batch(self.fd, keys, values, len(part))
                if err:
                    if done == 0 and err in _NO_BATCH and n == 0:
                        break
                    raise libbpf.error(err, f"update {self.info.name}")
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
            n, err = libbpf.map_delete_batch(self.fd, buf, len(part))
            if err:
                if err == errno.ENOENT:  # skip the missing key and go on
                    todo = todo[n + 1:]
                    continue
                if err in _NO_BATCH:
                    for k in todo[n:]:
                        self._delete(k)
                    return
                raise libbpf.error(err, f"delete from {self.info.name}")
            todo = todo[len(part):]


def _insns(*ops: tuple[int, int, int, int]) -> bytes:
    """struct bpf_insn, one per (opcode, dst | src << 4, offset, immediate)."""
    return b"".join(struct.pack("<BBhi", code, regs, off, imm) for code, regs, off, imm in ops)


def _verifier_accepts(prog_type: int, attach_type: int, insns: bytes) -> bool:
    """Does the verifier load this program (then closed at once)? EINVAL and EACCES are
    its no; anything else (EPERM: no privilege or a seccomp filter) is raised."""
    try:
        fd = libbpf.prog_load(prog_type, insns, "probe", expected_attach_type=attach_type)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EACCES):
            return False
        raise
    os.close(fd)
    return True


def probe_netns_cookie_helper() -> bool:
    """Does this kernel let cgroup_skb programs call bpf_get_netns_cookie (6.15+)?
    Asks the verifier with a three-instruction program; needs no compiler."""
    return _verifier_accepts(PROG_CGROUP_SKB, ATTACH_EGRESS, _insns(
        (0x85, 0x00, 0, _BPF_FUNC_GET_NETNS_COOKIE),  # call bpf_get_netns_cookie(ctx)
        (0xB7, 0x00, 0, 1),  # r0 = 1
        (0x95, 0x00, 0, 0),  # exit
    ))


@functools.lru_cache(maxsize=1)
def probe_sock_task_helpers() -> bool:
    """May cgroup/sock_create programs ask who "current" is (bpf_get_current_pid_tgid and
    bpf_get_current_comm, 6.1+)? Without them sockets' owner records carry no process."""
    return _verifier_accepts(PROG_CGROUP_SOCK, ATTACH_SOCK_CREATE, _insns(
        (0xBF, 0x16, 0, 0),  # r6 = r1
        (0x85, 0x00, 0, _BPF_FUNC_GET_CURRENT_PID_TGID),  # call bpf_get_current_pid_tgid
        (0xBF, 0xA1, 0, 0),  # r1 = r10
        (0x07, 0x01, 0, -16),  # r1 += -16
        (0xB7, 0x02, 0, 16),  # r2 = 16
        (0x85, 0x00, 0, _BPF_FUNC_GET_CURRENT_COMM),  # call bpf_get_current_comm(r1, r2)
        (0xB7, 0x00, 0, 1),  # r0 = 1
        (0x95, 0x00, 0, 0),  # exit
    ))


def load_tracing(insns: bytes, name: str, btf_id: int) -> int:
    """BPF_PROG_LOAD of a tp_btf program from BCC's compiled instructions. BCC loads tracing
    programs only as fentry/fexit (by a kfunc__ name); a BTF tracepoint needs the
    tracepoint's btf_trace_* id and BPF_TRACE_RAW_TP, which this passes itself."""
    return libbpf.prog_load(PROG_TRACING, insns, f"loading {name}", name=name,
                            expected_attach_type=ATTACH_TRACE_RAW_TP, attach_btf_id=btf_id, log_size=1 << 20)
