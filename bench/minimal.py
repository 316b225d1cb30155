"""Reference cgroup_skb programs, loaded without a compiler: the cheapest program a
cgroup-bpf kill switch could attach (one array-map lookup, then pass), so the bench can
show what the hook itself costs next to ksbpf's program."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.linux.bpf.kernel import ATTACH_EGRESS, PROG_CGROUP_SKB, prog_attach, prog_detach

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_MAP_CREATE, _PROG_LOAD = 0, 5
_MAP_ARRAY = 2
_PSEUDO_MAP_FD = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, "bpf(2) number unknown here")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def one_lookup_program(map_fd: int) -> bytes:
    """u32 k = 0; bpf_map_lookup_elem(map, &k); return 1;"""
    return b"".join([
        insn(0x62, dst=10, off=-4, imm=0),  # *(u32 *)(r10 - 4) = 0
        insn(0xBF, dst=2, src=10),  # r2 = r10
        insn(0x07, dst=2, imm=-4),  # r2 += -4
        insn(0x18, dst=1, src=_PSEUDO_MAP_FD, imm=map_fd),  # r1 = map (ld_imm64, two slots)
        insn(0x00),
        insn(0x85, imm=1),  # call bpf_map_lookup_elem
        insn(0xB7, dst=0, imm=1),  # r0 = 1 (pass)
        insn(0x95),  # exit
    ])


@dataclass
class MinimalCgroupProgram:
    cgroup: Path
    _map_fd: int = field(default=-1, init=False)
    _prog_fd: int = field(default=-1, init=False)
    _cg_fd: int = field(default=-1, init=False)

    def attach(self) -> None:
        a = ctypes.create_string_buffer(128)
        struct.pack_into("<IIII", a, 0, _MAP_ARRAY, 4, 8, 1)
        self._map_fd = _bpf(_MAP_CREATE, a)
        code = one_lookup_program(self._map_fd)
        prog = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(b"GPL")
        a = ctypes.create_string_buffer(128)
        struct.pack_into("<IIQQ", a, 0, PROG_CGROUP_SKB, len(code) // 8, ctypes.addressof(prog), ctypes.addressof(lic))
        struct.pack_into("<I", a, 68, ATTACH_EGRESS)
        self._prog_fd = _bpf(_PROG_LOAD, a)
        self._cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        prog_attach(self._prog_fd, self._cg_fd, ATTACH_EGRESS)

    def detach(self) -> None:
        if self._prog_fd >= 0 and self._cg_fd >= 0:
            try:
                prog_detach(self._prog_fd, self._cg_fd, ATTACH_EGRESS)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        for fd in (self._prog_fd, self._map_fd, self._cg_fd):
            if fd >= 0:
                os.close(fd)
        self._prog_fd = self._map_fd = self._cg_fd = -1
