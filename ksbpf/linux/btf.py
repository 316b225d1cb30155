"""What the drop-event program needs to know about the running kernel, read from its BTF
(/sys/kernel/btf/vmlinux): BCC compiles against a header tree that may belong to another
kernel version and has no CO-RE, so struct offsets and enum values are looked up here and
reach the program as -D flags (ksbpf.linux.bpf.loader.cflags).

Only the parts of the BTF format this needs are decoded: names, enums, structs and unions
(anonymous members followed), typedefs, pointers and function prototypes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ksbpf.errors import BpfError

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
# kind -> size of what follows a btf_type: (fixed bytes, bytes per vlen entry)
_TAIL = {1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0), 8: (0, 0), 9: (0, 0),
         10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0), 15: (0, 12), 16: (0, 0), 17: (4, 0),
         18: (0, 0), 19: (0, 12)}
KIND_PTR, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_TYPEDEF, KIND_FUNC_PROTO, KIND_ENUM64 = 2, 4, 5, 6, 8, 13, 19
_MODIFIERS = (9, 10, 11, 18)  # volatile, const, restrict, type tag


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    vlen: int
    kflag: bool
    size_or_type: int
    tail: bytes


class Btf:
    def __init__(self, raw: bytes) -> None:
        if len(raw) < 24:
            raise BpfError("BTF: too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", raw, 0)
        if magic != _MAGIC:
            raise BpfError("BTF: bad magic (big-endian or not BTF)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", raw, 8)
        self._strings = raw[hdr_len + str_off:hdr_len + str_off + str_len]
        data = raw[hdr_len + type_off:hdr_len + type_off + type_len]
        self.types: list[_Type | None] = [None]  # id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos = 0
        while pos < len(data):
            name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
            if kind not in _TAIL:
                raise BpfError(f"BTF: unknown kind {kind}")
            fixed, per = _TAIL[kind]
            end = pos + 12 + fixed + per * vlen
            t = _Type(kind, self.name(name_off), vlen, kflag, size_or_type, data[pos + 12:end])
            self._by_name.setdefault((kind, t.name), len(self.types))
            self.types.append(t)
            pos = end

    def name(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode()

    def find(self, kind: int, name: str) -> int:
        tid = self._by_name.get((kind, name))
        if tid is None:
            raise BpfError(f"BTF: no {name!r}")
        return tid

    def type(self, tid: int) -> _Type:
        t = self.types[tid]
        if t is None:
            raise BpfError("BTF: void where a type was expected")
        return t

    def resolve(self, tid: int) -> int:
        """Through typedefs and modifiers."""
        while True:
            t = self.type(tid)
            if t.kind not in (KIND_TYPEDEF, *_MODIFIERS):
                return tid
            tid = t.size_or_type

    def enum_value(self, enum: str, name: str) -> int:
        for kind in (KIND_ENUM, KIND_ENUM64):
            tid = self._by_name.get((kind, enum))
            if tid is None:
                continue
            t = self.type(tid)
            step = 8 if kind == KIND_ENUM else 12
            for i in range(t.vlen):
                off = struct.unpack_from("<I", t.tail, i * step)[0]
                if self.name(off) == name:
                    if kind == KIND_ENUM:
                        return int(struct.unpack_from("<i" if t.kflag else "<I", t.tail, i * step + 4)[0])
                    lo, hi = struct.unpack_from("<II", t.tail, i * step + 4)
                    return int(lo | (hi << 32))
        raise BpfError(f"BTF: enum {enum} has no {name}")

    def member_offset(self, struct_name: str, member: str) -> tuple[int, int]:
        """(byte offset, size) of a member, looked for in anonymous structs and unions too."""
        found = self._member(self.find(KIND_STRUCT, struct_name), member)
        if found is None:
            raise BpfError(f"BTF: struct {struct_name} has no member {member}")
        return found

    def _member(self, tid: int, member: str) -> tuple[int, int] | None:
        t = self.type(tid)
        for i in range(t.vlen):
            name_off, mtype, offset = struct.unpack_from("<III", t.tail, i * 12)
            bits = offset & 0xFFFFFF if t.kflag else offset
            mname = self.name(name_off)
            if mname == member:
                if bits % 8:
                    raise BpfError(f"BTF: {member} is a bit field")
                return bits // 8, self._size(mtype)
            if not mname:
                inner = self.resolve(mtype)
                if self.type(inner).kind in (KIND_STRUCT, KIND_UNION):
                    sub = self._member(inner, member)
                    if sub is not None:
                        return bits // 8 + sub[0], sub[1]
        return None

    def _size(self, tid: int) -> int:
        t = self.type(self.resolve(tid))
        return 8 if t.kind == KIND_PTR else t.size_or_type

    def type_name(self, tid: int) -> str:
        """"struct sk_buff *", "enum skb_drop_reason", ... (enough to tell arguments apart)."""
        t = self.type(self.resolve(tid))
        if t.kind == KIND_PTR:
            return self.type_name(t.size_or_type) + " *" if t.size_or_type else "void *"
        prefix = {KIND_STRUCT: "struct ", KIND_UNION: "union ", KIND_ENUM: "enum ", KIND_ENUM64: "enum "}
        return prefix.get(t.kind, "") + t.name

    def tracepoint_args(self, tp: str) -> tuple[int, list[str]]:
        """(BTF id of btf_trace_<tp>, the types of the tracepoint's arguments): a tp_btf
        program attaches by that id, and its ctx[i] is the i-th argument after the first
        (__data). The prototype names no arguments, so they are told apart by type."""
        tid = self.find(KIND_TYPEDEF, f"btf_trace_{tp}")
        ptr = self.type(self.resolve(tid))
        if ptr.kind != KIND_PTR:
            raise BpfError(f"BTF: btf_trace_{tp} is not a function pointer")
        proto = self.type(self.resolve(ptr.size_or_type))
        if proto.kind != KIND_FUNC_PROTO:
            raise BpfError(f"BTF: btf_trace_{tp} is not a function pointer")
        types = [self.type_name(struct.unpack_from("<II", proto.tail, i * 8)[1]) for i in range(proto.vlen)]
        return tid, types[1:]


@dataclass(frozen=True)
class KfreeSkb:
    """How to attach ks_kfree_skb to this kernel and read the skb it is handed."""

    btf_id: int
    skb_arg: int
    reason_arg: int
    netfilter_drop: int
    off_sk: int
    off_head: int
    off_network_header: int
    off_skb_iif: int

    def cflags(self) -> list[str]:
        return [
            "-DKS_NFT_EVENTS",
            f"-DKS_NETFILTER_DROP={self.netfilter_drop}",
            f"-DKS_TP_SKB_ARG={self.skb_arg}",
            f"-DKS_TP_REASON_ARG={self.reason_arg}",
            f"-DKS_OFF_SKB_SK={self.off_sk}",
            f"-DKS_OFF_SKB_HEAD={self.off_head}",
            f"-DKS_OFF_SKB_NH={self.off_network_header}",
            f"-DKS_OFF_SKB_IIF={self.off_skb_iif}",
        ]


def kfree_skb_info(btf: Btf) -> KfreeSkb:
    """BpfError when this kernel's kfree_skb tracepoint carries no drop reason (before 5.17)
    or its sk_buff lacks a field the program reads."""
    tid, args = btf.tracepoint_args("kfree_skb")
    skb, reason = "struct sk_buff *", "enum skb_drop_reason"
    if args.count(skb) != 1 or args.count(reason) != 1:
        raise BpfError(f"the kfree_skb tracepoint carries no drop reason here ({', '.join(args)}; 5.17+)")
    want = {"sk": 8, "head": 8, "network_header": 2, "skb_iif": 4}
    offs = {}
    for member, size in want.items():
        off, got = btf.member_offset("sk_buff", member)
        if got != size:
            raise BpfError(f"BTF: sk_buff.{member} is {got} bytes, expected {size}")
        offs[member] = off
    return KfreeSkb(tid, args.index(skb), args.index(reason),
                    btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP"),
                    offs["sk"], offs["head"], offs["network_header"], offs["skb_iif"])


@lru_cache(maxsize=1)
def running_kfree_skb() -> KfreeSkb | str:
    """The running kernel's KfreeSkb, or why there is none (a reason, for status)."""
    try:
        raw = VMLINUX.read_bytes()
    except OSError as e:
        return f"no kernel BTF at {VMLINUX} ({e.strerror})"
    try:
        return kfree_skb_info(Btf(raw))
    except (BpfError, struct.error) as e:
        return str(e)
