"""The one netlink message reader (ksbpf.linux.netlink), on datagrams built here the way
the kernel sends them: framing, multipart answers, errors, and input that does not fit,
which must end in a clear error rather than a guess or a loop."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from ksbpf.linux import netlink as nl

NEWOBJ = (nl.NFNL_SUBSYS_NFTABLES << 8) | 18


def msg(msg_type: int, payload: bytes = b"", flags: int = 0, seq: int = 7) -> bytes:
    raw = nl.message(msg_type, flags, seq, payload)
    return raw + b"\0" * (-len(raw) % 4)


def obj(name: str, seq: int = 7, multi: bool = True) -> bytes:
    payload = nl.nfgenmsg(1) + nl.attr(2, name.encode() + b"\0")
    return msg(NEWOBJ, payload, nl.NLM_F_MULTI if multi else 0, seq)


def done(seq: int = 7) -> bytes:
    return msg(nl.NLMSG_DONE, struct.pack("=i", 0), nl.NLM_F_MULTI, seq)


def error(err: int, seq: int = 7) -> bytes:
    return msg(nl.NLMSG_ERROR, struct.pack("=i", -err) + bytes(16), 0, seq)


def names(msgs: list[nl.Message] | Iterator[nl.Message]) -> list[str | None]:
    return [nl.text(m.nfnl_attrs().get(2)) for m in msgs]


def test_messages_of_a_datagram_in_order_padding_skipped() -> None:
    data = obj("a") + obj("odd-length") + done()
    got = list(nl.messages(data))
    assert [m.type for m in got] == [NEWOBJ, NEWOBJ, nl.NLMSG_DONE]
    assert names(got[:2]) == ["a", "odd-length"] and got[0].seq == 7 and got[0].flags == nl.NLM_F_MULTI
    assert got[1].nft_type() == 18 and got[2].nft_type() is None


def test_a_multipart_answer_spans_datagrams_and_ends_at_done() -> None:
    read: list[int] = []

    def datagrams() -> Iterator[bytes]:
        for i, d in enumerate([obj("a") + obj("b"), obj("c") + done() + obj("after done"), obj("never read")]):
            read.append(i)
            yield d

    assert names(nl.answer_of(datagrams(), seq=7)) == ["a", "b", "c"]
    assert read == [0, 1]  # nothing is read past NLMSG_DONE
    assert nl.answer_part(obj("a") + obj("b")) == (list(nl.messages(obj("a") + obj("b"))), False)


def test_a_single_answer_ends_at_its_message_and_an_ack_ends_one_too() -> None:
    assert names(nl.answer_of([obj("only", multi=False), obj("not read")], seq=7)) == ["only"]
    assert list(nl.answer_of([error(0)], seq=7)) == []


def test_messages_of_another_request_are_skipped() -> None:
    assert names(nl.answer_of([obj("stale", seq=6) + error(errno.EPERM, seq=6) + obj("mine"), done()], seq=7)) == ["mine"]


def test_an_error_answer_raises_its_errno() -> None:
    got: list[nl.Message] = []
    with pytest.raises(nl.NetlinkError) as e:
        for m in nl.answer_of([obj("a"), error(errno.ENOENT), obj("never read")], seq=7):
            got.append(m)
    assert e.value.errno == errno.ENOENT and "No such file" in str(e.value)
    assert names(got) == ["a"]  # the datagrams before it
    with pytest.raises(nl.NetlinkError, match="Operation not permitted"):
        nl.answer_part(obj("a") + error(errno.EPERM))
    with pytest.raises(nl.NetlinkError) as e:
        nl.answer_part(msg(nl.NLMSG_OVERRUN))
    assert e.value.errno == errno.ENOBUFS


def test_datagrams_that_run_out_before_done_are_an_error_not_a_wait() -> None:
    with pytest.raises(nl.NetlinkError, match="without NLMSG_DONE") as e:
        list(nl.answer_of([obj("a"), obj("b")], seq=7))
    assert e.value.errno == errno.EPROTO


@pytest.mark.parametrize("data, where", [
    (obj("a")[:-4], "offset 0 claims"),  # the datagram was cut short
    (obj("a") + obj("b")[:20], "offset 28 claims"),  # ...in its second message
    (obj("a") + b"\0" * 8, "ends 8 bytes into a message header"),
    (struct.pack("=IHHII", 0, NEWOBJ, 0, 7, 0), "claims 0 bytes"),  # a zero length must not loop
    (struct.pack("=IHHII", 8, NEWOBJ, 0, 7, 0) + bytes(8), "claims 8 bytes"),
])
def test_a_message_that_does_not_fit_is_a_clear_error(data: bytes, where: str) -> None:
    got: list[nl.Message] = []
    with pytest.raises(nl.MalformedMessage, match=where) as e:
        for m in nl.messages(data):
            got.append(m)
    assert e.value.errno == errno.EBADMSG and isinstance(e.value, OSError)
    assert names(got) == (["a"] if data.startswith(obj("a")) else [])
    # The same datagram as notifications: the whole messages before it count, nothing is guessed.
    assert names(nl.whole_messages(data)) == names(got)
    with pytest.raises(nl.MalformedMessage):
        nl.answer_part(data)


def test_a_short_error_message_is_malformed_not_an_ack() -> None:
    with pytest.raises(nl.MalformedMessage, match="too short"):
        nl.answer_part(msg(nl.NLMSG_ERROR, b"\0\0"))


def test_attributes_flags_masked_last_wins_and_a_bad_length_is_an_error() -> None:
    run = nl.attr(1 | 0x8000, b"nested") + nl.attr(2, struct.pack("!I", 9)) + nl.attr(2, struct.pack("!I", 10))
    assert nl.attrs(run) == {1: b"nested", 2: struct.pack("!I", 10)}
    assert nl.be32(nl.attrs(run)[2]) == 10 and nl.be32(b"\0") is None and nl.be32(None) is None
    assert nl.be64(struct.pack("!Q", 2**40)) == 2**40 and nl.text(b"ksbpf\0junk") == "ksbpf"
    with pytest.raises(nl.MalformedMessage, match="type 3 at offset 0 claims 2 bytes"):
        nl.attrs(struct.pack("=HH", 2, 3) + bytes(4))  # shorter than its own header: must not loop
    with pytest.raises(nl.MalformedMessage, match="claims 40 bytes; 8 are left"):
        nl.attrs(struct.pack("=HH", 40, 3) + bytes(4))
