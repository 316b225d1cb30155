"""ksbpf.linux.libbpf: the ctypes structs match libbpf 1.1's bpf.h and the kernel's
info structs byte for byte, and a missing libbpf.so.1 names its Debian package."""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.nobody
from ksbpf import deps
from ksbpf.deps import MissingDependency
from ksbpf.linux import libbpf

LP64 = ctypes.sizeof(ctypes.c_void_p) == 8 and ctypes.sizeof(ctypes.c_size_t) == 8
lp64 = pytest.mark.skipif(not LP64, reason="offsets below are those of a 64-bit (LP64) ABI")


def layout(cls: type[ctypes.Structure]) -> dict[str, int]:
    return {name: getattr(cls, name).offset for name, *_ in cls._fields_}


@lp64
def test_prog_load_opts_is_libbpf_1_1s() -> None:
    # struct bpf_prog_load_opts, offsetof() of each field as gcc lays it out on x86_64
    assert layout(libbpf.ProgLoadOpts) == {
        "sz": 0, "attempts": 8, "expected_attach_type": 12, "prog_btf_fd": 16, "prog_flags": 20,
        "prog_ifindex": 24, "kern_version": 28, "attach_btf_id": 32, "attach_prog_fd": 36,
        "attach_btf_obj_fd": 40, "fd_array": 48, "func_info": 56, "func_info_cnt": 64,
        "func_info_rec_size": 68, "line_info": 72, "line_info_cnt": 80, "line_info_rec_size": 84,
        "log_level": 88, "log_size": 92, "log_buf": 96,
    }
    assert ctypes.sizeof(libbpf.ProgLoadOpts) == 104


@lp64
def test_attach_and_batch_opts_are_libbpf_1_1s() -> None:
    assert layout(libbpf.ProgAttachOpts) == {"sz": 0, "flags": 8, "replace_prog_fd": 12}
    assert ctypes.sizeof(libbpf.ProgAttachOpts) == 16
    assert layout(libbpf.MapBatchOpts) == {"sz": 0, "elem_flags": 8, "flags": 16}
    assert ctypes.sizeof(libbpf.MapBatchOpts) == 24


@lp64
def test_test_run_opts_is_libbpf_1_1s() -> None:
    assert layout(libbpf.TestRunOpts) == {
        "sz": 0, "data_in": 8, "data_out": 16, "data_size_in": 24, "data_size_out": 28, "ctx_in": 32,
        "ctx_out": 40, "ctx_size_in": 48, "ctx_size_out": 52, "retval": 56, "repeat": 60, "duration": 64,
        "flags": 68, "cpu": 72, "batch_size": 76,
    }
    assert ctypes.sizeof(libbpf.TestRunOpts) == 80


def test_info_structs_are_the_kernels_prefixes() -> None:
    # struct bpf_prog_info up to gpl_compatible, struct bpf_map_info up to name (linux/bpf.h)
    assert layout(libbpf.BpfProgInfo) == {
        "type": 0, "id": 4, "tag": 8, "jited_prog_len": 16, "xlated_prog_len": 20, "jited_prog_insns": 24,
        "xlated_prog_insns": 32, "load_time": 40, "created_by_uid": 48, "nr_map_ids": 52, "map_ids": 56,
        "name": 64, "ifindex": 80, "gpl_compatible": 84,
    }
    assert ctypes.sizeof(libbpf.BpfProgInfo) == 88
    assert layout(libbpf.BpfMapInfo) == {
        "type": 0, "id": 4, "key_size": 8, "value_size": 12, "max_entries": 16, "map_flags": 20, "name": 24,
    }
    assert ctypes.sizeof(libbpf.BpfMapInfo) == 40


def test_prog_info_reads_name_and_map_ids_from_the_struct() -> None:
    info = libbpf.BpfProgInfo(id=7, name=b"ks_egress")
    assert info.name == b"ks_egress" and info.id == 7
    full = libbpf.BpfProgInfo(name=b"0123456789abcdef")  # 16 bytes, no NUL: still 16
    assert full.name == b"0123456789abcdef"


def test_every_bound_function_is_in_the_installed_library() -> None:
    try:
        lib = libbpf._lib()
    except MissingDependency as e:
        pytest.skip(str(e))
    for name in libbpf._PROTOTYPES:
        assert getattr(lib, name).restype is ctypes.c_int


def test_a_missing_libbpf_names_its_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "libbpf-ksbpf-test.so.0"
    monkeypatch.setattr(libbpf, "SONAME", missing)
    monkeypatch.setitem(deps.DEBIAN_LIBRARIES, missing, "libbpf1")
    libbpf._lib.cache_clear()
    try:
        with pytest.raises(MissingDependency, match=rf"library {missing} cannot be loaded .*: install the Debian "
                                                    r"package libbpf1") as info:
            libbpf.obj_get("/sys/fs/bpf/nothing")
        assert info.value.package == "libbpf1"
    finally:
        libbpf._lib.cache_clear()


def test_the_real_soname_maps_to_libbpf1() -> None:
    e = MissingDependency("libbpf.so.1", "cannot open shared object file")
    assert e.package == "libbpf1" and str(e).startswith("the library libbpf.so.1 cannot be loaded")


# As if libbpf1 were not installed: dlopen of libbpf.so.1 fails, everything else loads.
HIDE_LIBBPF = """\
import ctypes
_load = ctypes.CDLL.__init__


def _init(self, name, *args, **kw):
    if name == "libbpf.so.1":
        raise OSError("libbpf.so.1: cannot open shared object file: No such file or directory")
    _load(self, name, *args, **kw)


ctypes.CDLL.__init__ = _init
"""

POLICY = """\
[tunnel]
interfaces = ["wg0"]
endpoints = ["198.51.100.7:51820/udp"]
endpoint_mark = 0xca6c
[dns]
servers = ["10.64.0.1"]
"""


def _as_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


@pytest.fixture
def hidden_libbpf() -> Iterator[Path]:
    """A directory with the policy and a sitecustomize that hides libbpf.so.1, readable by nobody."""
    d = Path(tempfile.mkdtemp(prefix="ksbpf-libbpf-"))
    try:
        d.chmod(0o755)
        for name, text in (("sitecustomize.py", HIDE_LIBBPF), ("policy.toml", POLICY)):
            (d / name).write_text(text)
            (d / name).chmod(0o644)
        yield d
    finally:
        shutil.rmtree(d)


def run_without_libbpf(d: Path, module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """As nobody where we are root, in a namespace that does not exist: nothing could change
    even if the guard failed."""
    as_nobody = os.geteuid() == 0
    package = tests.nobody.package_copy() if as_nobody else str(tests.nobody.REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = f"{d}{os.pathsep}{package}"
    return subprocess.run([tests.nobody.PYTHON if as_nobody else sys.executable, "-m", module,
                           "--netns", "ksbpf-test-absent", "--state-dir", str(d / "state"), *argv],
                          env=env, capture_output=True, text=True, timeout=60, cwd=d,
                          preexec_fn=_as_nobody if as_nobody else None)


def test_ksctl_up_without_libbpf_refuses_before_changing_anything(hidden_libbpf: Path) -> None:
    d = hidden_libbpf
    r = run_without_libbpf(d, "ksbpf.cli", "up", "--config", str(d / "policy.toml"))
    assert r.returncode == 5, r.stdout + r.stderr
    assert "libbpf.so.1 cannot be loaded" in r.stderr and "install the Debian package libbpf1" in r.stderr
    assert "--no-bpf" in r.stderr and "Traceback" not in r.stderr and not (d / "state").exists()


def test_ksbpfd_without_libbpf_is_one_clear_exit(hidden_libbpf: Path) -> None:
    d = hidden_libbpf
    r = run_without_libbpf(d, "ksbpf.daemon", "--config", str(d / "policy.toml"), "--log-target", "stderr")
    assert r.returncode == 5, r.stderr
    assert "cannot start" in r.stderr and "install the Debian package libbpf1" in r.stderr
    assert "Traceback" not in r.stderr


def test_ksbpfd_no_bpf_does_not_need_libbpf(hidden_libbpf: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("checks that the next step, the root check, is reached")
    d = hidden_libbpf
    r = run_without_libbpf(d, "ksbpf.daemon", "--config", str(d / "policy.toml"), "--log-target", "stderr",
                           "--no-bpf")
    assert r.returncode == 1 and "must run as root" in r.stderr, r.stderr


def test_errors_are_the_errnos_own_oserror_with_what_failed() -> None:
    # Callers catch FileExistsError (a drop counter already there) and the like, as with the
    # hand-written bpf(2) wrapper before.
    e = libbpf.error(errno.EEXIST, "update ks_drops")
    assert type(e) is FileExistsError and e.errno == errno.EEXIST
    assert e.strerror == f"update ks_drops: {os.strerror(errno.EEXIST)}"
    assert type(libbpf.error(errno.ENOENT, "x")) is FileNotFoundError
    assert libbpf.error(524, "read m", "tail").strerror == f"read m: {os.strerror(524)}: tail"
