"""Reference cgroup_skb programs, loaded without a compiler: the cheapest program a
cgroup-bpf kill switch could attach (one array-map lookup, then pass), so the bench can
show what the hook itself costs next to ksbpf's program."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.linux.bpf.kernel import ATTACH_EGRESS, PROG_CGROUP_SKB
from ksbpf.linux.libbpf import map_create, prog_attach, prog_detach, prog_load

_MAP_ARRAY = 2
_PSEUDO_MAP_FD = 1


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
        self._map_fd = map_create(_MAP_ARRAY, "ks_bench_min", 4, 8, 1)
        self._prog_fd = prog_load(PROG_CGROUP_SKB, one_lookup_program(self._map_fd), "load the minimal program",
                                  expected_attach_type=ATTACH_EGRESS)
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
