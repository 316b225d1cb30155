"""nftables generation ids and change notifications, read straight from the kernel
(nfnetlink): every committed transaction in a network namespace raises its generation,
so an unchanged id proves nothing was committed in between, and each transaction's
notifications end with NFT_MSG_NEWGEN naming the generation and the writer's pid. Light
to import (ksctl's paths use it); the parsers are pure."""

from __future__ import annotations

import socket
from typing import NamedTuple

from ksbpf.linux.netlink import (
    NFNL_SUBSYS_NFTABLES,
    MalformedMessage,
    Message,
    NetlinkSocket,
    be32,
    nfgenmsg,
    text,
    whole_messages,
)

NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
# Attribute 1 names the table in every table, chain, rule, set, element and object message.
NFTA_TABLE_NAME = 1
_GEN_MASK = 0xFFFFFFFF


def gen_after(a: int | None, b: int | None) -> bool:
    """Is nftables generation `a` later than `b`? (u32 serial-number arithmetic; None is
    "none seen", before everything)."""
    if a is None:
        return False
    if b is None:
        return True
    return 0 < ((a - b) & _GEN_MASK) < 0x80000000


class NftNotification(NamedTuple):
    type: int  # NFT_MSG_*
    table: str | None  # the table a change is in; None for NEWGEN
    pid: int | None  # NEWGEN: the writer's pid
    gen: int | None  # NEWGEN: the generation the transaction committed


def nft_notification(m: Message) -> NftNotification | None:
    """An nftables message, decoded; None for any other message."""
    mtype = m.nft_type()
    if mtype is None:
        return None
    attrs = m.nfnl_attrs()
    if mtype == NFT_MSG_NEWGEN:
        return NftNotification(mtype, None, be32(attrs.get(NFTA_GEN_PROC_PID)), be32(attrs.get(NFTA_GEN_ID)))
    return NftNotification(mtype, text(attrs.get(NFTA_TABLE_NAME)), None, None)


def nft_notifications(msgs: list[Message]) -> list[NftNotification]:
    """The nftables messages among `msgs`, decoded; one with a malformed attribute is
    left out (the rest of its datagram still counts)."""
    out: list[NftNotification] = []
    for m in msgs:
        try:
            n = nft_notification(m)
        except MalformedMessage:
            continue
        if n is not None:
            out.append(n)
    return out


def parse_nft_notifications(data: bytes) -> list[tuple[int, str | None, int | None]]:
    """nfnetlink messages -> (message type, table name or None, writer pid or None)."""
    return [(n.type, n.table, n.pid) for n in nft_notifications(whole_messages(data))]


def parse_nft_generations(data: bytes) -> list[tuple[int, int | None]]:
    """NEWGEN messages (a transaction's end, or the answer to GETGEN) -> (generation id,
    writer pid or None)."""
    return [(n.gen, n.pid) for n in nft_notifications(whole_messages(data))
            if n.type == NFT_MSG_NEWGEN and n.gen is not None]


def nft_generation(sock: NetlinkSocket | None = None) -> int | None:
    """The current nftables generation id of the network namespace the socket (or, by
    default, a new one made now) belongs to: every committed transaction raises it. None
    when the kernel does not answer (within the socket's timeout: give it one)."""
    try:
        if sock is None:
            with NetlinkSocket(timeout=2.0) as own:
                return _ask_generation(own)
        return _ask_generation(sock)
    except OSError:
        return None


def _ask_generation(sock: NetlinkSocket) -> int | None:
    seq = sock.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, nfgenmsg(socket.AF_UNSPEC))
    for m in sock.answer(seq):
        n = nft_notification(m)
        if n is not None and n.type == NFT_MSG_NEWGEN:
            return n.gen
    return None
