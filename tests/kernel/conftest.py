"""Kernel-test fixtures: network namespaces and cgroups this test run creates, and
nothing else. Every fixture cleans up in its finalizer, also on failure."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ksbpf.linux.cgroup import cgroup2_mount, remove_cgroup_tree

pytestmark = pytest.mark.kernel


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="kernel tests need root")
        for item in items:
            if "tests/kernel" in str(item.fspath):
                item.add_marker(skip)


def unique(prefix: str) -> str:
    """A short unique name: interface names are limited to 15 characters and
    wireguard-go's control sockets are shared by all namespaces."""
    return f"{prefix}{secrets.token_hex(3)}"


def sh(*argv: str, check: bool = True, netns: str | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    cp: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        cmd, check=check, text=True, capture_output=True, **kw
    )
    return cp


def kill_netns_pids(name: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", name], text=True, capture_output=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


class NetnsFactory:
    def __init__(self) -> None:
        self.created: list[str] = []

    def __call__(self, prefix: str = "kst") -> str:
        name = unique(prefix)
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.created.append(name)
        sh("ip", "link", "set", "lo", "up", netns=name)
        return name

    def cleanup(self) -> None:
        for name in reversed(self.created):
            kill_netns_pids(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def make_netns() -> Iterator[NetnsFactory]:
    f = NetnsFactory()
    try:
        yield f
    finally:
        f.cleanup()


class CgroupFactory:
    """Cgroups below <cgroup2>/ksbpf-test-XXXX; removed depth-first, processes killed."""

    def __init__(self) -> None:
        self.mount = cgroup2_mount()
        self.root = self.mount / unique("ksbpf-test-")
        self.root.mkdir()

    def __call__(self, rel: str) -> Path:
        d = self.root / rel
        d.mkdir(parents=True, exist_ok=True)
        return d

    def rel(self, d: Path) -> str:
        """Path relative to the cgroup2 mount, as a policy names it."""
        return str(d.relative_to(self.mount))

    def cleanup(self) -> None:
        remove_cgroup_tree(self.root)


@pytest.fixture
def make_cgroup() -> Iterator[CgroupFactory]:
    f = CgroupFactory()
    try:
        yield f
    finally:
        f.cleanup()


def _enter_cgroup(directory: Path) -> Callable[[], None]:
    def pre() -> None:
        (directory / "cgroup.procs").write_text(str(os.getpid()))

    return pre


def run_in(
    argv: list[str], *, netns: str | None = None, cgroup: Path | None = None, timeout: float = 30, check: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv inside `cgroup` (joined before entering the namespace, since
    `ip netns exec` remounts /sys and hides the cgroup2 mount) and `netns`."""
    cmd = (["ip", "netns", "exec", netns] if netns else []) + argv
    return subprocess.run(
        cmd, text=True, capture_output=True, timeout=timeout, check=check, input=input,
        preexec_fn=_enter_cgroup(cgroup) if cgroup else None,
    )


def spawn_in(argv: list[str], *, netns: str | None = None, cgroup: Path | None = None, **kw: object) -> subprocess.Popen[str]:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + argv
    p: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
        cmd, text=True, preexec_fn=_enter_cgroup(cgroup) if cgroup else None, **kw
    )
    return p
