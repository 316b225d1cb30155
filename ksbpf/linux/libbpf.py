"""libbpf's low-level API (libbpf.so.1, Debian's libbpf1) through ctypes: the bpf(2)
commands the BPF layer uses, with libbpf's named structs instead of hand-packed attrs
and per-architecture syscall numbers.

Only bpf.h's thin wrappers (one bpf(2) command each), never bpf_object: no BCC, no LLVM,
no ELF in this process, so ksbpfd stays small. The library is opened on first use; where
it is missing that use raises MissingDependency naming the package (exit 5).

libbpf 1.x returns -errno (and sets errno); every function here raises an OSError instead,
of the errno's own subclass (FileExistsError for EEXIST, ...) with a strerror that reads
"<what>: <reason>", as the hand-written bpf(2) wrapper did. Batches return what they did
and the errno, since a caller goes on after some of them (a missing key, the end).

    fd = obj_get("/sys/fs/bpf/ksbpf/host/drops")
    value = map_lookup(fd, key, 16, "lookup in drops")
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ksbpf.deps import load_library

SONAME = "libbpf.so.1"

# linux/bpf.h (UAPI: stable numbers)
BPF_ANY, BPF_NOEXIST = 0, 1
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4
_BPF_LOG_LEVEL1 = 1

_u32 = ctypes.c_uint32
_Buffer = ctypes.Array[ctypes.c_char]


# The opts structs of libbpf 1.1's bpf.h. `sz` tells libbpf how much of the struct we know:
# an older or newer libbpf reads only the common part (and refuses unknown non-zero tails).


class ProgLoadOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", _u32),  # enum bpf_attach_type
        ("prog_btf_fd", _u32),
        ("prog_flags", _u32),
        ("prog_ifindex", _u32),
        ("kern_version", _u32),
        ("attach_btf_id", _u32),
        ("attach_prog_fd", _u32),
        ("attach_btf_obj_fd", _u32),
        ("fd_array", ctypes.POINTER(ctypes.c_int)),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", _u32),
        ("func_info_rec_size", _u32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", _u32),
        ("line_info_rec_size", _u32),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", ctypes.c_void_p),
    ]


class ProgAttachOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint), ("replace_prog_fd", ctypes.c_int)]


class MapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class TestRunOpts(ctypes.Structure):
    __test__ = False  # not a pytest class, whatever its name says
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", _u32),
        ("data_size_out", _u32),  # in: room at data_out; out: what the program left there
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("retval", _u32),  # out: what the program returned
        ("repeat", ctypes.c_int),
        ("duration", _u32),  # out: ns per run
        ("flags", _u32),
        ("cpu", _u32),
        ("batch_size", _u32),
    ]


# The kernel's info structs (linux/bpf.h), up to the last field read here: the kernel fills
# min(info_len, its own size), so a prefix is enough and stays valid on newer kernels.


class BpfProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),  # in: room at map_ids; out: how many the program has
        ("map_ids", ctypes.c_uint64),  # a pointer, as __aligned_u64
        ("name", ctypes.c_char * 16),
        ("ifindex", _u32),
        ("gpl_compatible", _u32, 1),
    ]


class BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * 16),
    ]


def _batch_opts(elem_flags: int = 0) -> MapBatchOpts:
    return MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts), elem_flags=elem_flags)


_p = ctypes.c_void_p
_pu32 = ctypes.POINTER(_u32)
_PROTOTYPES: dict[str, list[object]] = {
    "bpf_obj_get": [ctypes.c_char_p],
    "bpf_obj_pin": [ctypes.c_int, ctypes.c_char_p],
    "bpf_prog_attach_opts": [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ProgAttachOpts)],
    "bpf_prog_detach2": [ctypes.c_int, ctypes.c_int, ctypes.c_int],
    "bpf_prog_query": [ctypes.c_int, ctypes.c_int, _u32, _pu32, _pu32, _pu32],
    "bpf_prog_get_next_id": [_u32, _pu32],
    "bpf_prog_get_fd_by_id": [_u32],
    "bpf_map_get_fd_by_id": [_u32],
    "bpf_obj_get_info_by_fd": [ctypes.c_int, _p, _pu32],
    "bpf_map_lookup_elem": [ctypes.c_int, _p, _p],
    "bpf_map_update_elem": [ctypes.c_int, _p, _p, ctypes.c_uint64],
    "bpf_map_delete_elem": [ctypes.c_int, _p],
    "bpf_map_get_next_key": [ctypes.c_int, _p, _p],
    "bpf_map_lookup_batch": [ctypes.c_int, _p, _p, _p, _p, _pu32, ctypes.POINTER(MapBatchOpts)],
    "bpf_map_update_batch": [ctypes.c_int, _p, _p, _pu32, ctypes.POINTER(MapBatchOpts)],
    "bpf_map_delete_batch": [ctypes.c_int, _p, _pu32, ctypes.POINTER(MapBatchOpts)],
    "bpf_prog_load": [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, _p, ctypes.c_size_t,
                      ctypes.POINTER(ProgLoadOpts)],
    "bpf_raw_tracepoint_open": [ctypes.c_char_p, ctypes.c_int],
    "bpf_map_create": [ctypes.c_int, ctypes.c_char_p, _u32, _u32, _u32, _p],
    "bpf_prog_test_run_opts": [ctypes.c_int, ctypes.POINTER(TestRunOpts)],
    "bpf_link_create": [ctypes.c_int, ctypes.c_int, ctypes.c_int, _p],
}


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = load_library(SONAME)
    for name, argtypes in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int  # every one returns an fd, 0 or -errno
    return lib


def error(err: int, what: str, detail: str = "") -> OSError:
    """OSError(err, ...) is built as the errno's subclass, so callers may catch FileExistsError."""
    return OSError(err, f"{what}: {os.strerror(err)}" + (f": {detail}" if detail else ""))


def _call(ret: int, what: str) -> int:
    if ret < 0:
        raise error(-ret, what)
    return ret


def _addr(buf: _Buffer | None) -> int | None:
    return ctypes.addressof(buf) if buf is not None else None


# ------------------------------------------------------------------------ objects


def obj_get(path: Path | str) -> int:
    return _call(_lib().bpf_obj_get(os.fsencode(str(path))), f"open pinned {path}")


def obj_pin(fd: int, path: Path | str) -> None:
    _call(_lib().bpf_obj_pin(fd, os.fsencode(str(path))), f"pin {path}")


def prog_fd_by_id(prog_id: int, what: str) -> int:
    return _call(_lib().bpf_prog_get_fd_by_id(prog_id), what)


def map_fd_by_id(map_id: int, what: str) -> int:
    return _call(_lib().bpf_map_get_fd_by_id(map_id), what)


def prog_ids() -> Iterator[int]:
    """Ids of every BPF program loaded in the kernel (BPF_PROG_GET_NEXT_ID)."""
    cur = _u32(0)
    while True:
        ret = _lib().bpf_prog_get_next_id(cur.value, ctypes.byref(cur))
        if ret == -errno.ENOENT:
            return
        _call(ret, "list programs")
        yield cur.value


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


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    size = _u32(ctypes.sizeof(info))
    _call(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)


def prog_info(fd: int, max_maps: int = 64) -> ProgInfo:
    map_ids = (_u32 * max_maps)()
    info = BpfProgInfo(nr_map_ids=max_maps, map_ids=ctypes.addressof(map_ids))
    _info(fd, info, "program info")
    return ProgInfo(info.id, info.type, info.name.decode(errors="replace"),
                    tuple(map_ids[: min(info.nr_map_ids, max_maps)]))


def map_info(fd: int) -> MapInfo:
    info = BpfMapInfo()
    _info(fd, info, "map info")
    return MapInfo(info.id, info.type, info.key_size, info.value_size, info.max_entries, info.map_flags,
                   info.name.decode(errors="replace"))


# ------------------------------------------------------------------------ cgroup attachments


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int, replace_fd: int | None = None) -> None:
    """Attach with BPF_F_ALLOW_MULTI; with replace_fd, swap that attached program for this
    one in place (BPF_F_REPLACE: never zero programs, never both)."""
    opts = ProgAttachOpts(sz=ctypes.sizeof(ProgAttachOpts), flags=BPF_F_ALLOW_MULTI)
    if replace_fd is not None:
        opts.flags |= BPF_F_REPLACE
        opts.replace_prog_fd = replace_fd
    _call(_lib().bpf_prog_attach_opts(prog_fd, cgroup_fd, attach_type, ctypes.byref(opts)), "attach")


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    _call(_lib().bpf_prog_detach2(prog_fd, cgroup_fd, attach_type), "detach")


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup (not inherited ones)."""
    cap = 64
    while True:
        ids = (_u32 * cap)()
        count = _u32(cap)
        ret = _lib().bpf_prog_query(cgroup_fd, attach_type, 0, None, ids, ctypes.byref(count))
        if ret == -errno.ENOSPC:  # more attached than room: count holds how many
            cap = max(cap * 4, count.value)
            continue
        _call(ret, "query cgroup programs")
        return list(ids[: count.value])


# ------------------------------------------------------------------------ map elements


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """A new map's fd (ksbpf's own maps come from the loader child; this is for probes and tests)."""
    return _call(_lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None),
                 f"create map {name}")


def map_lookup(fd: int, key: bytes, value_size: int, what: str) -> bytes | None:
    """The value under key (value_size bytes: for per-CPU maps every CPU's), None if absent."""
    value = ctypes.create_string_buffer(value_size)
    ret = _lib().bpf_map_lookup_elem(fd, key, value)
    if ret == -errno.ENOENT:
        return None
    _call(ret, what)
    return value.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int, what: str) -> None:
    _call(_lib().bpf_map_update_elem(fd, key, value, flags), what)


def map_delete(fd: int, key: bytes, what: str) -> bool:
    """False when the key was not there."""
    ret = _lib().bpf_map_delete_elem(fd, key)
    if ret == -errno.ENOENT:
        return False
    _call(ret, what)
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int, what: str) -> bytes | None:
    """The key after `key` (None: the first), None after the last."""
    nxt = ctypes.create_string_buffer(key_size)
    ret = _lib().bpf_map_get_next_key(fd, key, nxt)
    if ret == -errno.ENOENT:
        return None
    _call(ret, what)
    return nxt.raw


# Batches: count goes in as the number of elements and comes back as the number done, also
# on failure, so a caller can skip past a missing key, read to the end, or fall back.


class Batch(NamedTuple):
    done: int  # elements done
    err: int  # 0, or the errno it stopped at (raise error(err, what) for those not handled)


def _batch(ret: int, count: ctypes.c_uint32) -> Batch:
    return Batch(count.value, -ret if ret < 0 else 0)


def map_lookup_batch(fd: int, in_batch: _Buffer | None, out_batch: _Buffer, keys: _Buffer, values: _Buffer,
                     count: int) -> Batch:
    """Read up to count elements into keys/values from the resume token in_batch (None: from
    the start); out_batch gets the token to resume from. ENOENT: the map is done."""
    n = _u32(count)
    opts = _batch_opts()
    ret = _lib().bpf_map_lookup_batch(fd, _addr(in_batch), _addr(out_batch), _addr(keys), _addr(values),
                                      ctypes.byref(n), ctypes.byref(opts))
    return _batch(ret, n)


def map_update_batch(fd: int, keys: _Buffer, values: _Buffer, count: int, flags: int = BPF_ANY) -> Batch:
    n = _u32(count)
    opts = _batch_opts(flags)
    ret = _lib().bpf_map_update_batch(fd, _addr(keys), _addr(values), ctypes.byref(n), ctypes.byref(opts))
    return _batch(ret, n)


def map_delete_batch(fd: int, keys: _Buffer, count: int) -> Batch:
    """Stops at the first key that is not there (ENOENT; count says where)."""
    n = _u32(count)
    opts = _batch_opts()
    ret = _lib().bpf_map_delete_batch(fd, _addr(keys), ctypes.byref(n), ctypes.byref(opts))
    return _batch(ret, n)


# ------------------------------------------------------------------------ programs


def prog_load(prog_type: int, insns: bytes, what: str, *, name: str | None = None, expected_attach_type: int = 0,
              attach_btf_id: int = 0, log_size: int = 0) -> int:
    """BPF_PROG_LOAD of ready instructions (struct bpf_insn, 8 bytes each): the program's fd.
    With log_size, a refusal's message ends with the verifier log's last three lines."""
    opts = ProgLoadOpts(sz=ctypes.sizeof(ProgLoadOpts), expected_attach_type=expected_attach_type,
                        attach_btf_id=attach_btf_id)
    log = ctypes.create_string_buffer(log_size) if log_size else None
    if log is not None:
        opts.log_level, opts.log_size, opts.log_buf = _BPF_LOG_LEVEL1, log_size, ctypes.addressof(log)
    ret = _lib().bpf_prog_load(prog_type, name.encode() if name else None, b"GPL", insns, len(insns) // 8,
                               ctypes.byref(opts))
    if ret < 0:
        tail = [ln for ln in log.value.decode(errors="replace").splitlines() if ln.strip()][-3:] if log is not None else []
        raise error(-ret, what, " / ".join(tail))
    return int(ret)


def raw_tracepoint_open(prog_fd: int) -> int:
    """Attach a tp_btf program (its tracepoint is in the program): a bpf_link fd (pin it to
    outlive this process)."""
    return _call(_lib().bpf_raw_tracepoint_open(None, prog_fd), "attaching the tracepoint")


def prog_test_run(prog_fd: int, data: bytes, what: str) -> int:
    """Run a program once on `data` (BPF_PROG_TEST_RUN): what it returned."""
    buf = ctypes.create_string_buffer(data, len(data))
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.addressof(buf), data_size_in=len(data),
                       repeat=1)
    _call(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), what)
    return int(opts.retval)


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    """A bpf_link attaching prog_fd to target_fd (a cgroup: held until the link's last fd
    closes, unlike prog_attach's attachments)."""
    return _call(_lib().bpf_link_create(prog_fd, target_fd, attach_type, None), what)
