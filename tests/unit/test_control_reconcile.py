"""The pure parts of the daemon's control loop: who may write the policy file, how an
nftables notification is read, and how a ruleset's shape and fingerprint tell drift
from traffic."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from ksbpf.errors import PolicyError
from ksbpf.linux.nftgen import NFT_MSG_NEWGEN, gen_after, parse_nft_generations, parse_nft_notifications
from ksbpf.policy_file import check_policy_dir_mode, check_policy_file_mode, read_policy_file
from ksbpf.reconcile.shape import NftShape, fingerprint, shape_of
from ksbpf.reconcile.watchers import CgroupWatcher, Event
from ksbpf.render.nft import render_nft

POLICY = """
[tunnel]
interfaces = ["wg0"]
endpoints = ["198.51.100.7:51820/udp"]
endpoint_mark = 0xca6c
[dns]
servers = ["10.64.0.1"]
"""


def fake_stat(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("mode, uid, ok", [
    (0o100600, 0, True), (0o100644, 0, True), (0o100400, 0, True),
    (0o100664, 0, False), (0o100646, 0, False), (0o100620, 0, False), (0o100600, 1000, False),
])
def test_only_root_may_be_able_to_write_the_policy(mode: int, uid: int, ok: bool) -> None:
    if ok:
        check_policy_file_mode(fake_stat(mode, uid), Path("/etc/ksbpf/policy.toml"))
    else:
        with pytest.raises(PolicyError, match=r"uid|writable"):
            check_policy_file_mode(fake_stat(mode, uid), Path("/etc/ksbpf/policy.toml"))


@pytest.mark.parametrize("mode, uid, ok", [
    (0o40755, 0, True), (0o41777, 0, True), (0o40775, 0, False), (0o40757, 0, False), (0o40755, 1000, False),
])
def test_nor_replace_it_through_its_directory(mode: int, uid: int, ok: bool) -> None:
    if ok:
        check_policy_dir_mode(fake_stat(mode, uid), Path("/etc/ksbpf/policy.toml"))
    else:
        with pytest.raises(PolicyError, match="directory"):
            check_policy_dir_mode(fake_stat(mode, uid), Path("/etc/ksbpf/policy.toml"))


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks want root-owned files")
def test_read_policy_file(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(POLICY)
    os.chmod(tmp_path, 0o755)
    os.chmod(p, 0o600)
    policy, text = read_policy_file(p)
    assert text == POLICY and policy.tunnel.interfaces == ("wg0",)
    os.chmod(p, 0o666)
    with pytest.raises(PolicyError, match="writable by group or others"):
        read_policy_file(p)
    os.chmod(p, 0o600)
    os.chmod(tmp_path, 0o777)
    with pytest.raises(PolicyError, match="directory"):
        read_policy_file(p)
    os.chmod(tmp_path, 0o755)
    (tmp_path / "fifo").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(PolicyError, match="not a regular file"):
        read_policy_file(tmp_path / "fifo")
    with pytest.raises(PolicyError, match="cannot read"):
        read_policy_file(tmp_path / "missing.toml")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def _nlmsg(msg_type: int, attrs: dict[int, bytes], family: int = 1) -> bytes:
    body = b""
    for t, v in attrs.items():
        a = struct.pack("=HH", 4 + len(v), t) + v
        body += a + b"\0" * (-len(a) % 4)
    payload = struct.pack("=BBH", family, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), (10 << 8) | msg_type, 0, 0, 0) + payload


def test_nftables_notifications_name_the_table_and_the_writer() -> None:
    data = (
        _nlmsg(3, {1: b"ksbpf\0", 3: b"output\0"})  # NEWCHAIN
        + _nlmsg(8, {1: b"other\0", 2: b"c\0"})  # DELRULE in someone else's table
        + _nlmsg(NFT_MSG_NEWGEN, {1: struct.pack("!I", 7), 2: struct.pack("!I", 4242), 3: b"nft\0"}, family=0)
    )
    assert parse_nft_notifications(data) == [(3, "ksbpf", None), (8, "other", None), (NFT_MSG_NEWGEN, None, 4242)]
    assert parse_nft_notifications(data[:30]) == []  # a truncated message is not guessed at
    # The generation a transaction ends with (also the answer to NFT_MSG_GETGEN).
    assert parse_nft_generations(data) == [(7, 4242)]


def test_generations_compare_across_the_u32_wrap() -> None:
    assert gen_after(8, 7) and not gen_after(7, 8) and not gen_after(7, 7)
    assert gen_after(3, 0xFFFFFFF0)  # wrapped: 3 came after 2**32 - 16
    assert not gen_after(0xFFFFFFF0, 3)
    assert gen_after(1, None) and not gen_after(None, 1) and not gen_after(None, None)


def test_shape_of_a_rendered_batch_matches_what_it_adds() -> None:
    from ksbpf.policy import loads_policy

    policy = loads_policy(POLICY)
    batch = render_nft(policy, {2: "eth0"})["nftables"]
    shape = shape_of(batch)
    chains = {c[1]: c for c in shape.chains}
    assert chains["output"][2:4] == ("output", "drop")
    assert chains["egress_if2"] == ("netdev", "egress_if2", "egress", "drop", "eth0")
    rules = {(f, c): n for f, c, n in shape.rules}
    assert rules[("inet", "output")] == sum(
        1 for c in batch if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "output" and c["add"]["rule"]["family"] == "inet")
    assert ("inet", "drop_no_tunnel_ip4") in shape.counters
    # One interface more is a different shape; so is one rule less.
    assert shape_of(render_nft(policy, {2: "eth0", 3: "eth1"})["nftables"]) != shape
    fewer = [c for c in batch if not ("rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "input")]
    diff = shape.describe_difference(shape_of(fewer))
    assert diff.startswith("rules: expected") and "input" in diff


def test_fingerprint_ignores_counter_values_but_not_handles_or_elements() -> None:
    listing = [
        {"table": {"family": "inet", "name": "ksbpf", "handle": 1}},
        {"counter": {"family": "inet", "table": "ksbpf", "name": "drop_dns_ip4", "handle": 2, "packets": 0, "bytes": 0}},
        {"rule": {"family": "inet", "table": "ksbpf", "chain": "output", "handle": 3, "expr": [{"accept": None}]}},
        {"set": {"family": "inet", "table": "ksbpf", "name": "lan4", "handle": 4, "elem": []}},
    ]
    busy = [dict(o) for o in listing]
    busy[1] = {"counter": {**listing[1]["counter"], "packets": 99, "bytes": 9000}}
    assert fingerprint(busy) == fingerprint(listing)
    readded = [dict(o) for o in listing]
    readded[2] = {"rule": {**listing[2]["rule"], "handle": 30}}
    assert fingerprint(readded) != fingerprint(listing)
    element = [dict(o) for o in listing]
    element[3] = {"set": {**listing[3]["set"], "elem": ["10.0.0.0/8"]}}
    assert fingerprint(element) != fingerprint(listing)


def test_shapes_compare_as_values() -> None:
    a = NftShape(frozenset(), frozenset({("inet", "output", 3)}), frozenset(), frozenset())
    b = NftShape(frozenset(), frozenset({("inet", "output", 2)}), frozenset(), frozenset())
    assert a != b and a == NftShape(frozenset(), frozenset({("inet", "output", 3)}), frozenset(), frozenset())
    assert "rules" in a.describe_difference(b)


def test_a_listing_without_netdev_devices_is_compared_without_them() -> None:
    """nft 1.0.6 lists a netdev chain in JSON without its device (its text output has it):
    that must not look like drift, or every check would "repair" the ruleset."""
    want = NftShape(frozenset({("inet", "output", "output", "drop", ""), ("netdev", "egress_if3", "egress", "drop", "eth0")}),
                    frozenset(), frozenset(), frozenset())
    listed = NftShape(frozenset({("inet", "output", "output", "drop", ""), ("netdev", "egress_if3", "egress", "drop", "")}),
                      frozenset(), frozenset(), frozenset())
    assert want != listed and want.devices_as_listed(listed) == listed
    assert want.devices_as_listed(want) == want  # a listing that names devices is compared with them
    other = NftShape(frozenset({("inet", "output", "output", "drop", ""), ("netdev", "egress_if3", "egress", "drop", "eth1")}),
                     frozenset(), frozenset(), frozenset())
    assert want.devices_as_listed(other) != other


def _drain(events: list[Event], want: int = 1, timeout: float = 5.0) -> list[Event]:
    import time

    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(events)


def test_cgroup_watcher_follows_exemptions_one_at_a_time(tmp_path: Path) -> None:
    """Real inotify on directories standing in for cgroups: change() adds and drops the
    watch for one exemption's cgroup without touching the others' (shared parents are
    counted), refresh() moves a watch down when a missing parent appears, and an event
    names the directory that came or went."""
    slice_ = tmp_path / "system.slice"
    slice_.mkdir()
    a, b = slice_ / "a.service", slice_ / "b.service"
    later = tmp_path / "later.slice" / "c.service"  # its parent does not exist yet
    events: list[Event] = []
    w = CgroupWatcher(events.append)
    w.start()
    try:
        w.watch([a])
        assert w.watched() == [slice_]
        w.change([b, later], [])
        assert w.watched() == [tmp_path, slice_]
        w.change([], [a])
        assert w.watched() == [tmp_path, slice_]  # b still needs system.slice
        w.change([], [b])
        assert w.watched() == [tmp_path]

        (tmp_path / "later.slice").mkdir()
        got = _drain(events)
        assert got and got[0].kind == "cgroup" and got[0].paths == (tmp_path / "later.slice",)
        w.refresh([later])
        assert w.watched() == [tmp_path / "later.slice"]
        events.clear()
        later.mkdir()
        got = _drain(events)
        assert got and got[0].paths == (later,)
        w.change([], [later])
        assert w.watched() == []
    finally:
        w.stop()
