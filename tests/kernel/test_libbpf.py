"""ksbpf.linux.libbpf against the running kernel: a tiny cgroup_skb program loaded,
attached to a cgroup this test makes, replaced in place, queried and detached; pinned
under a bpffs directory this test makes; a hash map written and read one by one and in
batches. Everything is removed in finalizers."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksbpf.linux import libbpf
from ksbpf.linux.bpffs import BPFFS
from ksbpf.linux.btf import running_kfree_skb
from tests.kernel.conftest import CgroupFactory, unique

PROG_CGROUP_SKB, PROG_TRACING = 8, 26
ATTACH_EGRESS, ATTACH_TRACE_RAW_TP = 1, 23
MAP_HASH, MAP_PERCPU_HASH = 1, 5


def insns(*ops: tuple[int, int, int, int]) -> bytes:
    """struct bpf_insn: code, dst | src << 4, off, imm."""
    return b"".join(struct.pack("<BBhi", code, regs, off, imm) for code, regs, off, imm in ops)


def returns(value: int) -> bytes:
    return insns((0xB7, 0x00, 0, value), (0x95, 0x00, 0, 0))  # r0 = value; exit


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds a test opens, closed after it."""
    opened: list[int] = []
    try:
        yield opened
    finally:
        for fd in opened:
            os.close(fd)


@pytest.fixture
def cgroup(make_cgroup: CgroupFactory, fds: list[int]) -> int:
    fd = os.open(make_cgroup("libbpf"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds.append(fd)
    return fd


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    if not os.path.ismount(BPFFS):
        pytest.skip(f"no bpffs at {BPFFS}")
    d = BPFFS / unique("ksbpf-test-libbpf-")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)  # unlinking a pin drops its reference


def load_egress(name: str, fds: list[int]) -> int:
    fd = libbpf.prog_load(PROG_CGROUP_SKB, returns(1), "load", name=name, expected_attach_type=ATTACH_EGRESS)
    fds.append(fd)
    return fd


def test_attach_replace_query_detach_on_a_test_cgroup(cgroup: int, fds: list[int]) -> None:
    first, second = load_egress("ks_lbtest_a", fds), load_egress("ks_lbtest_b", fds)
    a, b = libbpf.prog_info(first), libbpf.prog_info(second)
    assert (a.name, b.name, a.type) == ("ks_lbtest_a", "ks_lbtest_b", PROG_CGROUP_SKB)
    assert a.map_ids == () and a.id != b.id

    assert libbpf.prog_query(cgroup, ATTACH_EGRESS) == []
    try:
        libbpf.prog_attach(first, cgroup, ATTACH_EGRESS)
        assert libbpf.prog_query(cgroup, ATTACH_EGRESS) == [a.id]
        libbpf.prog_attach(second, cgroup, ATTACH_EGRESS, replace_fd=first)  # in place: never none, never both
        assert libbpf.prog_query(cgroup, ATTACH_EGRESS) == [b.id]
        with pytest.raises(OSError) as stale:  # `first` is no longer attached: nothing to replace
            libbpf.prog_attach(first, cgroup, ATTACH_EGRESS, replace_fd=first)
        assert str(stale.value.strerror).startswith("attach: ")
        assert libbpf.prog_query(cgroup, ATTACH_EGRESS) == [b.id]
        libbpf.prog_attach(first, cgroup, ATTACH_EGRESS)  # ALLOW_MULTI: a second one beside it
        assert sorted(libbpf.prog_query(cgroup, ATTACH_EGRESS)) == sorted([a.id, b.id])
    finally:
        for fd in (first, second):
            try:
                libbpf.prog_detach(fd, cgroup, ATTACH_EGRESS)
            except OSError as e:
                assert e.errno == errno.ENOENT
    assert libbpf.prog_query(cgroup, ATTACH_EGRESS) == []
    with pytest.raises(OSError) as gone:
        libbpf.prog_detach(first, cgroup, ATTACH_EGRESS)
    assert gone.value.errno == errno.ENOENT and gone.value.strerror == f"detach: {os.strerror(errno.ENOENT)}"


def test_a_link_holds_its_attachment_until_closed(cgroup: int, fds: list[int]) -> None:
    prog = load_egress("ks_lbtest_link", fds)
    link = libbpf.link_create(prog, cgroup, ATTACH_EGRESS, "link create")
    try:
        assert libbpf.prog_query(cgroup, ATTACH_EGRESS) == [libbpf.prog_info(prog).id]
    finally:
        os.close(link)
    assert libbpf.prog_query(cgroup, ATTACH_EGRESS) == []


def test_a_test_run_returns_what_the_program_returned(fds: list[int]) -> None:
    eth = b"\0" * 12 + b"\x88\xb5"  # an Ethernet header with no IP behind it
    for value in (0, 1):
        prog = libbpf.prog_load(PROG_CGROUP_SKB, returns(value), "load", expected_attach_type=ATTACH_EGRESS)
        fds.append(prog)
        assert libbpf.prog_test_run(prog, eth, "test run") == value


def test_ids_and_fds_by_id(fds: list[int]) -> None:
    fd = load_egress("ks_lbtest_id", fds)
    info = libbpf.prog_info(fd)
    assert info.id in set(libbpf.prog_ids())
    again = libbpf.prog_fd_by_id(info.id, "open program")
    fds.append(again)
    assert libbpf.prog_info(again) == info
    with pytest.raises(OSError) as e:
        libbpf.prog_fd_by_id(0xFFFFFFF0, "open program id 4294967280")
    assert e.value.errno == errno.ENOENT and str(e.value.strerror).startswith("open program id 4294967280: ")


def test_pin_and_open_pinned(pin_dir: Path, fds: list[int]) -> None:
    fd = load_egress("ks_lbtest_pin", fds)
    libbpf.obj_pin(fd, pin_dir / "prog")
    got = libbpf.obj_get(pin_dir / "prog")
    fds.append(got)
    assert libbpf.prog_info(got).id == libbpf.prog_info(fd).id
    with pytest.raises(OSError) as e:
        libbpf.obj_pin(fd, pin_dir / "prog")
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FileNotFoundError) as e:
        libbpf.obj_get(pin_dir / "nothing")
    assert e.value.errno == errno.ENOENT
    assert e.value.strerror == f"open pinned {pin_dir / 'nothing'}: {os.strerror(errno.ENOENT)}"


def key(i: int) -> bytes:
    return struct.pack("<I", i)


def val(i: int) -> bytes:
    return struct.pack("<Q", i * 1000 + 7)


def test_hash_map_elements_and_batches(fds: list[int]) -> None:
    fd = libbpf.map_create(MAP_HASH, "ks_lbtest_map", 4, 8, 4096)
    fds.append(fd)
    info = libbpf.map_info(fd)
    assert (info.type, info.key_size, info.value_size, info.max_entries, info.name) == \
        (MAP_HASH, 4, 8, 4096, "ks_lbtest_map")

    assert libbpf.map_lookup(fd, key(1), 8, "lookup") is None
    assert libbpf.map_next_key(fd, None, 4, "iterate") is None
    libbpf.map_update(fd, key(1), val(1), libbpf.BPF_ANY, "update")
    assert libbpf.map_lookup(fd, key(1), 8, "lookup") == val(1)
    with pytest.raises(FileExistsError) as e:  # the errno's own OSError subclass, as callers catch it
        libbpf.map_update(fd, key(1), val(2), libbpf.BPF_NOEXIST, "update m")
    assert e.value.errno == errno.EEXIST and e.value.strerror == f"update m: {os.strerror(errno.EEXIST)}"
    assert libbpf.map_next_key(fd, None, 4, "iterate") == key(1)
    assert libbpf.map_next_key(fd, key(1), 4, "iterate") is None
    assert libbpf.map_delete(fd, key(1), "delete") is True
    assert libbpf.map_delete(fd, key(1), "delete") is False

    n = 3000
    keys = b"".join(key(i) for i in range(n))
    values = b"".join(val(i) for i in range(n))
    kbuf, vbuf = ctypes.create_string_buffer(keys, len(keys)), ctypes.create_string_buffer(values, len(values))
    assert libbpf.map_update_batch(fd, kbuf, vbuf, n) == (n, 0)

    # Read it back in chunks, resuming from the token each call leaves (a bucket number).
    chunk, got = 512, {}
    tokens = [ctypes.create_string_buffer(8) for _ in range(2)]
    first = True
    while True:
        ko, vo = ctypes.create_string_buffer(4 * chunk), ctypes.create_string_buffer(8 * chunk)
        count, err = libbpf.map_lookup_batch(fd, None if first else tokens[0], tokens[1], ko, vo, chunk)
        if err == errno.ENOSPC:  # one bucket holds more than a chunk
            chunk *= 4
            continue
        assert err in (0, errno.ENOENT)  # ENOENT: the end, with its last entries
        for i in range(count):
            got[ko.raw[i * 4:(i + 1) * 4]] = vo.raw[i * 8:(i + 1) * 8]
        if err:
            break
        ctypes.memmove(tokens[0], tokens[1], 8)
        first = False
    assert got == {key(i): val(i) for i in range(n)}

    # Delete a batch that holds a key not in the map: it stops there and says how far it got.
    gone = [key(i) for i in range(10)] + [key(n + 5)] + [key(i) for i in range(10, 20)]
    dbuf = ctypes.create_string_buffer(b"".join(gone), 4 * len(gone))
    assert libbpf.map_delete_batch(fd, dbuf, len(gone)) == (10, errno.ENOENT)
    assert libbpf.map_lookup(fd, key(9), 8, "lookup") is None
    assert libbpf.map_lookup(fd, key(10), 8, "lookup") == val(10)
    rest = ctypes.create_string_buffer(b"".join(gone[11:]), 40)
    assert libbpf.map_delete_batch(fd, rest, 10) == (10, 0)
    assert libbpf.map_lookup(fd, key(19), 8, "lookup") is None
    assert libbpf.map_lookup(fd, key(20), 8, "lookup") == val(20)


def test_per_cpu_values_are_every_cpus(fds: list[int]) -> None:
    fd = libbpf.map_create(MAP_PERCPU_HASH, "ks_lbtest_pcpu", 4, 8, 16)
    fds.append(fd)
    possible = Path("/sys/devices/system/cpu/possible").read_text().strip()
    ncpus = sum(int(hi or lo) - int(lo) + 1 for lo, _, hi in (p.partition("-") for p in possible.split(",")))
    libbpf.map_update(fd, key(3), b"".join(val(c) for c in range(ncpus)), libbpf.BPF_ANY, "update")
    assert libbpf.map_lookup(fd, key(3), 8 * ncpus, "lookup") == b"".join(val(c) for c in range(ncpus))


def test_a_refused_program_carries_the_verifier_log(fds: list[int]) -> None:
    bad = insns((0x95, 0x00, 0, 0))  # exit without setting r0
    with pytest.raises(PermissionError) as e:  # EACCES: the verifier's no
        libbpf.prog_load(PROG_CGROUP_SKB, bad, "loading ks_lbtest_bad", name="ks_lbtest_bad",
                         expected_attach_type=ATTACH_EGRESS, log_size=1 << 16)
    assert e.value.errno == errno.EACCES
    assert str(e.value.strerror).startswith(f"loading ks_lbtest_bad: {os.strerror(errno.EACCES)}: ")
    assert "R0 !read_ok" in str(e.value.strerror)
    with pytest.raises(OSError) as quiet:
        libbpf.prog_load(PROG_CGROUP_SKB, bad, "probe", expected_attach_type=ATTACH_EGRESS)
    assert quiet.value.strerror == f"probe: {os.strerror(errno.EACCES)}"


def test_a_tp_btf_program_attaches_through_a_link(fds: list[int]) -> None:
    kfree = running_kfree_skb()
    if isinstance(kfree, str):
        pytest.skip(kfree)
    # returns 0 and touches nothing: attaching it changes no packet's fate
    prog = libbpf.prog_load(PROG_TRACING, returns(0), "loading ks_lbtest_tp", name="ks_lbtest_tp",
                            expected_attach_type=ATTACH_TRACE_RAW_TP, attach_btf_id=kfree.btf_id, log_size=1 << 16)
    fds.append(prog)
    link = libbpf.raw_tracepoint_open(prog)
    fds.append(link)
    assert libbpf.prog_info(prog).type == PROG_TRACING
    with pytest.raises(OSError) as e:
        libbpf.raw_tracepoint_open(-1)
    assert e.value.errno == errno.EBADF and str(e.value.strerror).startswith("attaching the tracepoint: ")


def test_an_fd_that_is_no_map_fails_naming_the_call() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            libbpf.map_info(r)
    finally:
        os.close(r)
        os.close(w)
    assert e.value.errno == errno.EINVAL and e.value.strerror == f"map info: {os.strerror(errno.EINVAL)}"
