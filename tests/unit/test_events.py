"""Drop events without a kernel: the ring buffer record parser, the journal's coalescer, the
watch hub's bounded queues, and BTF lookups on a handmade BTF blob."""

from __future__ import annotations

import struct

import pytest

from ksbpf import events as ev
from ksbpf.errors import BpfError
from ksbpf.linux import btf
from ksbpf.linux.bpf import layout as bpf_layout
from ksbpf.verdict import DROP_REASONS, Reason

REASON = {r: i for i, r in enumerate(DROP_REASONS)}


def record(*, t_ns: int = 5_000_000_000, cg: int = 77, pid: int = 4242, count: int = 1, comm: bytes = b"leaky-dns",
           fam: int = 4, proto: int = 17, layer: int = 1, reason: Reason = Reason.DNS, dport: int = 53,
           daddr: bytes = bytes([10, 77, 0, 3]) + bytes(12)) -> bytes:
    # dport as the kernel stores it: network order in memory
    raw_port = struct.unpack("<H", dport.to_bytes(2, "big"))[0]
    return struct.pack(ev.EVENT_FMT, t_ns, cg, pid, count, comm, fam, proto, layer, REASON[reason], raw_port, 0, daddr)


def test_layouts_match_the_c_structs() -> None:
    assert ev.EVENT_SIZE == 64 == struct.calcsize(bpf_layout.EVENT_FMT)  # struct ks_event
    assert ev.EVENT_FMT == bpf_layout.EVENT_FMT
    assert struct.calcsize(bpf_layout.OWNER_FMT) == 40  # struct ks_owner
    assert struct.calcsize(bpf_layout.RATE_KEY_FMT) == 16 and struct.calcsize(bpf_layout.RATE_FMT) == 64  # ks_rate_key, ks_rate


def test_record_parses_into_an_event() -> None:
    e = ev.parse_record(record(), monotonic_now=6.0, wall_now=1_000_000.0)
    assert e == ev.DropEvent(time=999_999.0, pid=4242, comm="leaky-dns", cgroup_id=77, cgroup="#77", family="ipv4",
                             proto="udp", daddr="10.77.0.3", dport=53, reason="dns", layer="bpf", count=1)
    assert e.dest == "10.77.0.3:53"
    six = ev.parse_record(record(fam=6, proto=6, layer=2, reason=Reason.NO_TUNNEL, dport=443, count=9,
                                 daddr=bytes.fromhex("fd770000000000000000000000000002")), 6.0, 1.0)
    assert (six.family, six.proto, six.daddr, six.dport, six.layer, six.reason, six.count) == (
        "ipv6", "tcp", "fd77::2", 443, "nftables", "no_tunnel", 9)
    assert six.dest == "[fd77::2]:443"
    # Trailing padding is allowed (records are 8-byte aligned); a short one is refused.
    assert ev.parse_record(record() + bytes(8), 6.0, 1.0).pid == 4242
    with pytest.raises(ev.BadRecord):
        ev.parse_record(record()[:63])


def test_event_json_round_trip_and_human_line() -> None:
    e = ev.parse_record(record(), monotonic_now=5.0, wall_now=1_764_000_000.25)
    d = e.as_dict()
    assert d["time"] == "2025-11-24T16:00:00.250Z"
    assert {"time", "pid", "comm", "cgroup", "family", "proto", "daddr", "dport", "reason", "layer", "count"} <= set(d)
    assert ev.DropEvent.from_dict(d) == e
    assert e.line() == "2025-11-24T16:00:00.250Z bpf dropped udp to 10.77.0.3:53 (dns) from leaky-dns[4242] in #77"
    none = ev.parse_record(record(pid=0, comm=b""), 5.0, 1.0)
    assert "(no process)" in none.line()


def event(**kw: object) -> ev.DropEvent:
    base = ev.parse_record(record(), 5.0, 100.0)
    return ev.DropEvent(**{**base.__dict__, **kw})  # type: ignore[arg-type]


def test_coalescer_one_line_per_process_destination_and_reason_per_interval() -> None:
    c = ev.Coalescer(interval=10.0)
    c.add(event(count=1), now=0.0)
    c.add(event(count=5), now=1.0)
    c.add(event(count=2, dport=853), now=2.0)
    c.add(event(count=3, pid=1), now=3.0)
    assert not c.due(9.9)
    assert c.due(10.0)
    lines, folded = c.flush()
    assert folded == 0
    by = {(x.first.pid, x.first.dport): (x.count, x.events) for x in lines}
    assert by == {(4242, 53): (6, 2), (4242, 853): (2, 1), (1, 53): (3, 1)}
    assert not c.due(100.0) and c.flush() == ([], 0)
    f = ev.journal_fields(lines[0])
    assert f == {"KSBPF_EVENT": "drop", "KSBPF_PID": "4242", "KSBPF_COMM": "leaky-dns", "KSBPF_CGROUP": "#77",
                 "KSBPF_DEST": "10.77.0.3:53", "KSBPF_PROTO": "udp", "KSBPF_REASON": "dns", "KSBPF_LAYER": "bpf",
                 "KSBPF_COUNT": "6"}
    assert ev.journal_message(lines[0], 10.0) == (
        "dropped 6 udp packets from leaky-dns[4242] in #77 to 10.77.0.3:53: dns (bpf; within 10 s)")


def test_coalescer_is_bounded() -> None:
    c = ev.Coalescer(interval=1.0, max_keys=3)
    for port in range(10):
        c.add(event(dport=port, count=2), now=0.0)
    lines, folded = c.flush()
    assert len(lines) == 3 and folded == 14


def test_watch_hub_filters_bounds_and_drops_for_slow_watchers() -> None:
    hub = ev.WatchHub(max_subscribers=2, queue_size=2)
    dns = hub.subscribe(ev.WatchFilter(reason="dns"))
    sub = hub.subscribe(ev.WatchFilter(cgroup="a/b"))
    with pytest.raises(ev.Busy):
        hub.subscribe(ev.WatchFilter())
    hub.publish([event(cgroup="a/b/c"), event(cgroup="a/bc", reason="no_tunnel"), event(cgroup="a/b"),
                 event(cgroup="x")])
    assert dns.queue.qsize() == 2 and dns.dropped == 1  # three dns events, room for two
    assert [sub.queue.get_nowait().cgroup for _ in range(2)] == ["a/b/c", "a/b"]  # type: ignore[union-attr]
    assert sub.dropped == 0
    hub.unsubscribe(sub)
    assert len(hub) == 1
    hub.close()
    items = []
    while not dns.queue.empty():
        items.append(dns.queue.get_nowait())
    assert items[-1] is None, "a closed hub wakes its sessions with None"
    with pytest.raises(ev.Busy):
        hub.subscribe(ev.WatchFilter())


def _btf_blob() -> bytes:
    """A tiny BTF: enum skb_drop_reason, struct sk_buff (an anonymous union inside),
    and btf_trace_kfree_skb's prototype, as the kernel lays them out."""
    strings = b"\0"
    names: dict[str, int] = {}

    def s(name: str) -> int:
        nonlocal strings
        if name not in names:
            names[name] = len(strings)
            strings += name.encode() + b"\0"
        return names[name]

    types = b""

    def t(name: str, kind: int, vlen: int, size_or_type: int, tail: bytes = b"", kflag: int = 0) -> None:
        nonlocal types
        types += struct.pack("<III", s(name) if name else 0, (kflag << 31) | (kind << 24) | vlen, size_or_type) + tail

    t("int", 1, 0, 4, struct.pack("<I", 32))  # 1
    t("sk_buff", 4, 3, 200, struct.pack("<III", s("next"), 3, 0) + struct.pack("<III", 0, 5, 64 * 8)
      + struct.pack("<III", s("skb_iif"), 1, 144 * 8))  # 2
    t("", 2, 0, 2)  # 3: struct sk_buff *
    t("sock", 4, 0, 100)  # 4
    t("", 5, 4, 16, struct.pack("<III", s("sk"), 6, 0) + struct.pack("<III", s("head"), 6, 8 * 8)
      + struct.pack("<III", s("network_header"), 7, 12 * 8) + struct.pack("<III", s("mark"), 1, 0))  # 5: union
    t("", 2, 0, 4)  # 6: struct sock *
    t("__u16", 1, 0, 2, struct.pack("<I", 16))  # 7
    t("skb_drop_reason", 6, 2, 4, struct.pack("<Ii", s("SKB_DROP_REASON_NOT_SPECIFIED"), 2)
      + struct.pack("<Ii", s("SKB_DROP_REASON_NETFILTER_DROP"), 12))  # 8
    t("", 13, 4, 0, struct.pack("<II", 0, 10) + struct.pack("<II", 0, 3) + struct.pack("<II", 0, 10)
      + struct.pack("<II", 0, 8))  # 9: proto (void *, skb *, void *, reason)
    t("", 2, 0, 0)  # 10: void *
    t("", 2, 0, 9)  # 11: pointer to the prototype
    t("btf_trace_kfree_skb", 8, 0, 11)  # 12
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_btf_lookups() -> None:
    info = btf.kfree_skb_info(btf.Btf(_btf_blob()))
    assert info == btf.KfreeSkb(btf_id=12, skb_arg=0, reason_arg=2, netfilter_drop=12, off_sk=64, off_head=72,
                                off_network_header=76, off_skb_iif=144)
    assert "-DKS_NETFILTER_DROP=12" in info.cflags() and "-DKS_OFF_SKB_SK=64" in info.cflags()
    with pytest.raises(BpfError, match="bad magic"):
        btf.Btf(b"\0" * 32)
    with pytest.raises(BpfError, match="no member"):
        btf.Btf(_btf_blob()).member_offset("sk_buff", "nope")


def test_watch_requests_are_validated_strictly() -> None:
    from ksbpf.control import BadRequest, validate_request

    assert validate_request('{"op": "watch"}') == {"op": "watch"}
    assert validate_request('{"op": "watch", "cgroup": "/a/b/", "reason": "dns"}') == {
        "op": "watch", "cgroup": "a/b", "reason": "dns"}
    for bad, key in (('{"op": "watch", "reason": "nope"}', "reason"), ('{"op": "watch", "reason": 1}', "reason"),
                     ('{"op": "watch", "cgroup": 5}', "cgroup"), ('{"op": "watch", "cgroup": "a/../.."}', "cgroup"),
                     ('{"op": "watch", "follow": true}', "follow")):
        with pytest.raises(BadRequest) as e:
            validate_request(bad)
        assert e.value.key == key, bad
