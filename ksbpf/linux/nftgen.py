"""nftables generation ids, read straight from the kernel (NFT_MSG_GETGEN): every
committed transaction in a network namespace raises its generation, so an unchanged id
proves nothing was committed in between. Light to import (ksctl's paths use it); the
parsers are pure."""

from __future__ import annotations

import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_GEN_MASK = 0xFFFFFFFF


def gen_after(a: int | None, b: int | None) -> bool:
    """Is nftables generation `a` later than `b`? (u32 serial-number arithmetic; None is
    "none seen", before everything)."""
    if a is None:
        return False
    if b is None:
        return True
    return 0 < ((a - b) & _GEN_MASK) < 0x80000000


def parse_nft_generations(data: bytes) -> list[tuple[int, int | None]]:
    """NEWGEN messages (a transaction's end, or the answer to GETGEN) -> (generation id,
    writer pid or None)."""
    out: list[tuple[int, int | None]] = []
    off = 0
    while off + 20 <= len(data):
        length, typ = struct.unpack_from("=IH", data, off)
        if length < 20 or off + length > len(data):
            break
        if typ == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            attrs = _nl_attrs(data, off + 20, off + length)
            gen, pid = attrs.get(NFTA_GEN_ID), attrs.get(NFTA_GEN_PROC_PID)
            if gen is not None and len(gen) == 4:
                out.append((struct.unpack("!I", gen)[0], struct.unpack("!I", pid)[0] if pid and len(pid) == 4 else None))
        off += (length + 3) & ~3
    return out


def _nl_attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    a = start
    while a + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, a)
        if alen < 4:
            break
        attrs[atype & 0x3FFF] = data[a + 4:a + alen]
        a += (alen + 3) & ~3
    return attrs


def nft_generation(sock: socket.socket | None = None) -> int | None:
    """The current nftables generation id of the network namespace the socket (or, by
    default, a new one made now) belongs to: every committed transaction raises it. None
    when the kernel does not answer."""
    own = sock is None
    if sock is None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
            sock.bind((0, 0))
        except OSError:
            return None
    try:
        sock.settimeout(2.0)
        seq = int.from_bytes(os.urandom(4), "little") or 1
        req = struct.pack("=IHHII", 20, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, seq, 0)
        sock.send(req + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
        while True:
            data = sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, typ, _flags, mseq = struct.unpack_from("=IHHI", data, off)
                if length < 16 or off + length > len(data):
                    break
                if mseq == seq:
                    if typ == NLMSG_ERROR:
                        return None
                    gens = parse_nft_generations(data[off:off + length])
                    return gens[0][0] if gens else None
                off += (length + 3) & ~3
    except OSError:
        return None
    finally:
        if own:
            sock.close()
