"""Raw netlink, for what ksbpf reads from nfnetlink itself (nftables generations, named
counters, change notifications): libnftables has no call for these, and listing the
ruleset through it caches every set element first.

One socket type and one way to read messages:

- `NetlinkSocket`: a socket of the network namespace it is opened in (optionally
  subscribed to multicast groups), `request()` to send, `answer()` to read the reply to a
  request across datagrams, `notifications()` for one datagram of multicast messages;
- `messages()`: the messages of one datagram, pure (`whole_messages()`: those before a
  malformed tail); `answer_part()`/`answer_of()`: what datagrams add to an answer
  (NLMSG_DONE, NLMSG_ERROR, multipart), pure;
- `attrs()`/`attr()`: netlink attributes, read and built.

Standard library only (plus ksbpf.linux.netns to open a socket elsewhere).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ksbpf.linux.netns import netns

log = logging.getLogger("ksbpf.netlink")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# nfnetlink: the message type is subsystem << 8 | message; a struct nfgenmsg leads the payload.
NFNL_SUBSYS_NFTABLES = 10
NFNLGRP_NFTABLES = 7

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
NFGENMSG = struct.Struct("=BBH")  # family, version (NFNETLINK_V0), resource id (big endian)
NLATTR = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")

RECV_SIZE = 1 << 16


class NetlinkError(OSError):
    """The kernel answered a request with an error (its errno), or sent something that
    cannot be read (EBADMSG, see MalformedMessage)."""


class MalformedMessage(NetlinkError):
    """A message or attribute whose length does not fit the bytes it came in: a datagram
    cut short (a receive buffer too small) or not netlink at all."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EBADMSG, what)


class Message(NamedTuple):
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes  # what follows the header, padding excluded

    def nft_type(self) -> int | None:
        """The NFT_MSG_* type of an nftables message; None for any other message."""
        return self.type & 0xFF if self.type >> 8 == NFNL_SUBSYS_NFTABLES else None

    def nfnl_attrs(self) -> dict[int, bytes]:
        """The attributes of an nfnetlink message (after its struct nfgenmsg)."""
        return attrs(self.payload[NFGENMSG.size:])


def _align(n: int) -> int:
    return (n + 3) & ~3


def message(msg_type: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type, flags, seq, pid) + payload


def attr(kind: int, payload: bytes) -> bytes:
    raw = NLATTR.pack(NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nfgenmsg(family: int, res_id: int = 0) -> bytes:
    return NFGENMSG.pack(family, 0, socket.htons(res_id))


def messages(data: bytes) -> Iterator[Message]:
    """The messages of one datagram, in order. A length that does not fit (shorter than a
    header, or past the end) raises MalformedMessage after the messages before it."""
    off = 0
    while off < len(data):
        if len(data) - off < NLMSGHDR.size:
            raise MalformedMessage(f"netlink datagram ends {len(data) - off} bytes into a message header "
                                   f"(at offset {off} of {len(data)})")
        length, msg_type, flags, seq, pid = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            raise MalformedMessage(f"netlink message at offset {off} claims {length} bytes; "
                                   f"{len(data) - off} are left and a header takes {NLMSGHDR.size}")
        yield Message(msg_type, flags, seq, pid, data[off + NLMSGHDR.size:off + length])
        off += _align(length)


def whole_messages(data: bytes) -> list[Message]:
    """The messages of one datagram of notifications, a malformed tail logged and
    dropped: the messages before it still count, and nothing after it is guessed at."""
    out: list[Message] = []
    try:
        for m in messages(data):
            out.append(m)
    except MalformedMessage as e:
        log.warning("netlink notification dropped: %s", e.strerror)
    return out


def error_of(msg: Message) -> int:
    """The errno an NLMSG_ERROR message carries (0: an acknowledgement)."""
    if len(msg.payload) < _ERRNO.size:
        raise MalformedMessage(f"NLMSG_ERROR of {len(msg.payload)} bytes, too short for an error code")
    return -int(_ERRNO.unpack_from(msg.payload)[0])


def answer_part(data: bytes, seq: int | None = None) -> tuple[list[Message], bool]:
    """What one datagram adds to the answer to request `seq` (None: any): its messages
    other than control ones, and whether the answer is complete. Complete: NLMSG_DONE
    (the end of a multipart answer), an acknowledgement, or a message that is not part of
    a multipart answer. An error answer raises NetlinkError with its errno; messages of
    another sequence number (a stale answer) are skipped."""
    out: list[Message] = []
    for m in messages(data):
        if seq is not None and m.seq != seq:
            continue
        if m.type == NLMSG_NOOP:
            continue
        if m.type == NLMSG_DONE:
            return out, True
        if m.type == NLMSG_ERROR:
            err = error_of(m)
            if err:
                raise NetlinkError(err, os.strerror(err))
            return out, True
        if m.type == NLMSG_OVERRUN:
            raise NetlinkError(errno.ENOBUFS, "the kernel reports lost data (NLMSG_OVERRUN)")
        out.append(m)
        if not m.flags & NLM_F_MULTI:
            return out, True
    return out, False


def answer_of(datagrams: Iterable[bytes], seq: int | None = None) -> Iterator[Message]:
    """The messages of one answer, read from datagrams until it is complete (see
    answer_part). Datagrams that run out first raise NetlinkError, never wait for more."""
    for data in datagrams:
        part, done = answer_part(data, seq)
        yield from part
        if done:
            return
    raise NetlinkError(errno.EPROTO, "the netlink answer ended without NLMSG_DONE")


def attrs(buf: bytes) -> dict[int, bytes]:
    """Attribute type (flags masked off) -> payload, of a run of netlink attributes; a
    type given twice keeps the last. An attribute that does not fit raises MalformedMessage."""
    out: dict[int, bytes] = {}
    off = 0
    while off + NLATTR.size <= len(buf):
        length, kind = NLATTR.unpack_from(buf, off)
        if length < NLATTR.size or off + length > len(buf):
            raise MalformedMessage(f"netlink attribute of type {kind & NLA_TYPE_MASK} at offset {off} claims "
                                   f"{length} bytes; {len(buf) - off} are left")
        out[kind & NLA_TYPE_MASK] = buf[off + NLATTR.size:off + length]
        off += _align(length)
    return out


def be32(raw: bytes | None) -> int | None:
    """A big-endian u32 attribute (nfnetlink sends network byte order); None if absent or not 4 bytes."""
    return struct.unpack("!I", raw)[0] if raw is not None and len(raw) == 4 else None


def be64(raw: bytes | None) -> int | None:
    return struct.unpack("!Q", raw)[0] if raw is not None and len(raw) == 8 else None


def text(raw: bytes | None) -> str | None:
    """A NUL-terminated string attribute; None if absent."""
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


_seqs = itertools.count(int.from_bytes(os.urandom(2), "little") + 1)


class NetlinkSocket:
    """A netlink socket, bound, of the network namespace `netns_name` (None: this
    thread's). A socket belongs to the namespace it was made in for good: only the
    creation happens there. `timeout` bounds every receive (None: block)."""

    def __init__(self, protocol: int = NETLINK_NETFILTER, *, netns_name: str | None = None,
                 groups: Iterable[int] = (), rcvbuf: int | None = None, timeout: float | None = None) -> None:
        with netns(netns_name):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            self.sock.bind((0, 0))
            for group in groups:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            if rcvbuf is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def next_seq() -> int:
        return next(_seqs) & 0xFFFFFFFF or 1

    def send(self, msg: bytes) -> None:
        """Send messages built whole (see message())."""
        self.sock.send(msg)

    def request(self, msg_type: int, payload: bytes, flags: int = NLM_F_REQUEST) -> int:
        """Send one request; returns its sequence number, for answer()."""
        seq = self.next_seq()
        self.send(message(msg_type, flags, seq, payload))
        return seq

    def _datagrams(self) -> Iterator[bytes]:
        while True:
            yield self.sock.recv(RECV_SIZE)

    def answer(self, seq: int) -> Iterator[Message]:
        """The messages answering request `seq`, across as many datagrams as it takes
        (each receive bounded by the socket's timeout)."""
        return answer_of(self._datagrams(), seq)

    def notifications(self) -> list[Message]:
        """The whole messages of one received datagram (multicast notifications). ENOBUFS
        (the kernel dropped notifications: the receive buffer was full) is raised."""
        return whole_messages(self.sock.recv(RECV_SIZE))
