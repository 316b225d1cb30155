"""The NFT_MSG_GETOBJ dump parser, on messages built here the way the kernel sends them
(tests/kernel/test_nft_routing.py compares a real dump with `nft list counters`)."""

from __future__ import annotations

import struct

import pytest

from ksbpf.linux import netlink as nl
from ksbpf.linux import nftcounters as nc


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    return nl.attr(kind | (0x8000 if nested else 0), payload)


def _obj(table: str, name: str, packets: int, nbytes: int, obj_type: int = nc.NFT_OBJECT_COUNTER) -> bytes:
    data = _attr(nc.NFTA_COUNTER_BYTES, struct.pack(">Q", nbytes)) + _attr(nc.NFTA_COUNTER_PACKETS, struct.pack(">Q", packets))
    body = nl.NFGENMSG.pack(1, 0, 0) + _attr(nc.NFTA_OBJ_TABLE, table.encode() + b"\0")
    body += _attr(nc.NFTA_OBJ_NAME, name.encode() + b"\0") + _attr(nc.NFTA_OBJ_TYPE, struct.pack(">I", obj_type))
    body += _attr(nc.NFTA_OBJ_DATA, data, nested=True)
    kind = (nl.NFNL_SUBSYS_NFTABLES << 8) | nc.NFT_MSG_NEWOBJ
    return nl.NLMSGHDR.pack(nl.NLMSGHDR.size + len(body), kind, 2, 1, 0) + body


def _done() -> bytes:
    return nl.NLMSGHDR.pack(nl.NLMSGHDR.size + 4, nl.NLMSG_DONE, 2, 1, 0) + b"\0" * 4


def _error(errno: int) -> bytes:
    return nl.NLMSGHDR.pack(nl.NLMSGHDR.size + 4, nl.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno)


def test_counters_of_the_table_are_read_and_others_skipped() -> None:
    data = _obj("ksbpf", "drop_dns_ip4", 7, 700) + _obj("other", "drop_dns_ip4", 1, 1)
    data += _obj("ksbpf", "quota", 1, 1, obj_type=2) + _obj("ksbpf", "drop_odd_name_", 2**40, 2**50)
    assert nc.parse_counters(data, "ksbpf") == ({"drop_dns_ip4": (7, 700), "drop_odd_name_": (2**40, 2**50)}, False)
    assert nc.parse_counters(data + _done(), "ksbpf")[1] is True


def test_errors_are_raised_with_their_errno() -> None:
    with pytest.raises(nl.NetlinkError) as e:
        nc.parse_counters(_error(1), "ksbpf")
    assert e.value.errno == 1
    assert nc.parse_counters(_error(0) + _done(), "ksbpf") == ({}, True)  # an ACK


def test_dump_request_asks_for_counters_of_one_table() -> None:
    req = nc.dump_request("netdev", "ksbpf", seq=9)
    length, kind, flags, seq, _pid = nl.NLMSGHDR.unpack_from(req)
    assert length == len(req) and kind == (10 << 8) | 19 and flags == nl.NLM_F_REQUEST | nl.NLM_F_DUMP and seq == 9
    family = req[nl.NLMSGHDR.size]
    assert family == 5
    attrs = nl.attrs(req[nl.NLMSGHDR.size + nl.NFGENMSG.size:])
    assert attrs == {nc.NFTA_OBJ_TABLE: b"ksbpf\0", nc.NFTA_OBJ_TYPE: struct.pack(">I", 1)}
