"""Named nftables counters read straight from the kernel (NFT_MSG_GETOBJ dump).

libnftables answers `list counters` only after caching every set element of the table
(0.12 s per table at 10,000 exemptions), and the counters are read on every metrics
scrape and before every re-apply. The dump asks for counter objects of one table and
nothing else. Called inside the namespace; the parser is pure.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFPROTO = {"inet": 1, "netdev": 5}
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")


class CounterReadError(OSError):
    pass


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def dump_request(family: str, table: str, seq: int = 1) -> bytes:
    body = _NFGENMSG.pack(NFPROTO[family], 0, 0)
    body += _attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
    body += _attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _attrs(buf: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + _NLATTR.size <= len(buf):
        length, kind = _NLATTR.unpack_from(buf, off)
        if length < _NLATTR.size:
            break
        yield kind & NLA_TYPE_MASK, buf[off + _NLATTR.size:off + length]
        off += (length + 3) & ~3


def parse_counters(data: bytes, table: str) -> tuple[dict[str, tuple[int, int]], bool]:
    """Netlink messages -> ({name: (packets, bytes)} of `table`'s counters, done)."""
    out: dict[str, tuple[int, int]] = {}
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        msg = data[off + _NLMSGHDR.size:off + length]
        off += (length + 3) & ~3
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", msg)[0]
            if err:
                raise CounterReadError(err, os.strerror(err))
            continue
        if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
            continue
        fields = dict(_attrs(msg[_NFGENMSG.size:]))
        if fields.get(NFTA_OBJ_TABLE, b"").rstrip(b"\0").decode() != table:
            continue
        if struct.unpack(">I", fields.get(NFTA_OBJ_TYPE, b"\0\0\0\0"))[0] != NFT_OBJECT_COUNTER:
            continue
        values = dict(_attrs(fields.get(NFTA_OBJ_DATA, b"")))
        name = fields.get(NFTA_OBJ_NAME, b"").rstrip(b"\0").decode()
        packets = struct.unpack(">Q", values.get(NFTA_COUNTER_PACKETS, bytes(8)))[0]
        nbytes = struct.unpack(">Q", values.get(NFTA_COUNTER_BYTES, bytes(8)))[0]
        out[name] = (packets, nbytes)
    return out, False


def read_counters(family: str, table: str) -> dict[str, tuple[int, int]]:
    """{name: (packets, bytes)} of every counter in `family table` ({} if no such table)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(5.0)
        s.bind((0, 0))
        s.send(dump_request(family, table))
        out: dict[str, tuple[int, int]] = {}
        while True:
            try:
                part, done = parse_counters(s.recv(1 << 16), table)
            except CounterReadError as e:
                if e.errno == 2:  # ENOENT: the table is not there
                    return {}
                raise
            out.update(part)
            if done:
                return out
