"""Named nftables counters read straight from the kernel (NFT_MSG_GETOBJ dump).

libnftables answers `list counters` only after caching every set element of the table
(0.12 s per table at 10,000 exemptions), and the counters are read on every metrics
scrape and before every re-apply. The dump asks for counter objects of one table and
nothing else. Called inside the namespace; the parser is pure.
"""

from __future__ import annotations

import errno
import struct

from ksbpf.linux.netlink import (
    NFNL_SUBSYS_NFTABLES,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    Message,
    NetlinkError,
    NetlinkSocket,
    answer_part,
    attr,
    attrs,
    be32,
    be64,
    message,
    nfgenmsg,
    text,
)

NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFPROTO = {"inet": 1, "netdev": 5}


def dump_request(family: str, table: str, seq: int = 1) -> bytes:
    """The GETOBJ dump request for the counter objects of `family table`, and nothing else."""
    payload = (nfgenmsg(NFPROTO[family]) + attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
               + attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER)))
    return message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ, NLM_F_REQUEST | NLM_F_DUMP, seq, payload)


def counter_of(m: Message, table: str) -> tuple[str, tuple[int, int]] | None:
    """A NEWOBJ message -> (name, (packets, bytes)) when it is a counter of `table`."""
    if m.nft_type() != NFT_MSG_NEWOBJ:
        return None
    fields = m.nfnl_attrs()
    if text(fields.get(NFTA_OBJ_TABLE)) != table or be32(fields.get(NFTA_OBJ_TYPE)) != NFT_OBJECT_COUNTER:
        return None
    values = attrs(fields.get(NFTA_OBJ_DATA, b""))
    name = text(fields.get(NFTA_OBJ_NAME)) or ""
    return name, (be64(values.get(NFTA_COUNTER_PACKETS)) or 0, be64(values.get(NFTA_COUNTER_BYTES)) or 0)


def parse_counters(data: bytes, table: str) -> tuple[dict[str, tuple[int, int]], bool]:
    """One datagram of the dump -> ({name: (packets, bytes)} of `table`'s counters, done).
    An error answer raises NetlinkError with its errno."""
    msgs, done = answer_part(data)
    out: dict[str, tuple[int, int]] = {}
    for m in msgs:
        counter = counter_of(m, table)
        if counter is not None:
            out[counter[0]] = counter[1]
    return out, done


def read_counters(family: str, table: str) -> dict[str, tuple[int, int]]:
    """{name: (packets, bytes)} of every counter in `family table` ({} if no such table)."""
    out: dict[str, tuple[int, int]] = {}
    with NetlinkSocket(timeout=5.0) as s:
        seq = s.next_seq()
        s.send(dump_request(family, table, seq))
        try:
            for m in s.answer(seq):
                counter = counter_of(m, table)
                if counter is not None:
                    out[counter[0]] = counter[1]
        except NetlinkError as e:
            if e.errno == errno.ENOENT:  # the table is not there
                return {}
            raise
    return out
