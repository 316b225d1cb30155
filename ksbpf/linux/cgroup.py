"""cgroup2: find the mount, resolve policy paths safely, read cgroup ids."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Collection
from pathlib import Path

from ksbpf.errors import CgroupError
from ksbpf.policy import normalize_cgroup
from ksbpf.procmounts import cgroup2_mount_point


def cgroup2_mount(mounts: str = "/proc/mounts") -> Path:
    """The cgroup2 mount point (/sys/fs/cgroup on unified systems, .../unified on hybrid)."""
    try:
        found = cgroup2_mount_point(mounts)
    except OSError as e:
        raise CgroupError(f"cannot read {mounts}: {e.strerror}", source="cgroup2") from None
    if found is not None:
        return found
    raise CgroupError(
        "no cgroup2 mount in /proc/mounts (inside `ip netns exec`? use ksctl --netns instead)",
        source="cgroup2",
    )


def cgroup_dir(path: str, mount: Path | None = None) -> Path:
    """A policy cgroup path -> its directory, refusing anything that escapes the mount."""
    root = (mount or cgroup2_mount()).resolve()
    try:
        rel = normalize_cgroup(path)
    except ValueError as e:
        raise CgroupError(str(e), source="cgroup", key=path) from None
    full = (root / rel).resolve() if rel else root
    if full != root and root not in full.parents:
        raise CgroupError(f"{path!r} escapes the cgroup2 mount {root}", source="cgroup", key=path)
    return full


def cgroup_id(directory: Path) -> int:
    """The kernel's cgroup id is the inode number of the cgroup's directory."""
    return os.stat(directory).st_ino


def relative_path(directory: Path, mount: Path | None = None) -> str:
    root = (mount or cgroup2_mount()).resolve()
    p = directory.resolve()
    return "" if p == root else str(p.relative_to(root))


def process_cgroup(pid: int | str = "self") -> str:
    """The cgroup2 path of a process, relative to the mount ('' is the root)."""
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        for line in f:
            hid, _, rest = line.rstrip("\n").partition(":")
            controllers, _, path = rest.partition(":")
            if hid == "0" and controllers == "":
                return path.strip("/")
    raise CgroupError(f"process {pid} has no cgroup2 membership", source="cgroup")


def move_pid(directory: Path, pid: int) -> None:
    (directory / "cgroup.procs").write_text(f"{pid}\n")


def ids_by_path(mount: Path | None = None, under: str = "") -> dict[str, int]:
    """Every cgroup below `under` (inclusive) -> id, for resolving ids back to paths."""
    root = (mount or cgroup2_mount()).resolve()
    start = cgroup_dir(under, root)
    out: dict[str, int] = {}
    for dirpath, _dirnames, _ in os.walk(start):
        p = Path(dirpath)
        rel = "" if p == root else str(p.relative_to(root))
        try:
            out[rel] = cgroup_id(p)
        except FileNotFoundError:
            continue
    return out


def remove_cgroup_tree(root: Path, protected: Collection[int] = ()) -> list[str]:
    """Remove a cgroup tree this program made, deepest first, killing what still runs in
    it (but `protected` pids, e.g. ourselves). Returns the cgroups that would not go."""
    if not root.exists():
        return []
    dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    problems = []
    for d in [*dirs, root]:
        # A killed process leaves its cgroup only once it has exited, which on a loaded
        # machine can take seconds: wait up to 10 s before calling the cgroup stuck.
        for _ in range(500):
            try:
                pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                break
            if pids and not set(protected).intersection(pids) and (d / "cgroup.kill").exists():
                with contextlib.suppress(OSError):  # every task at once, forks included (5.14+)
                    (d / "cgroup.kill").write_text("1")
            for pid in pids:
                if pid not in protected:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
        else:
            problems.append(f"cgroup {d}")
    return problems
