"""Our programs on cgroups: found by asking the kernel (which knows them whatever became
of the pins), attached (atomically replacing the previous generation's where it can),
re-attached and detached."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ksbpf.errors import BpfError, KsbpfError
from ksbpf.linux.bpf.generations import Generation, active_config, legacy_config
from ksbpf.linux.bpf.kernel import ATTACH_TYPES, BpfMap
from ksbpf.linux.bpf.layout import PROGS
from ksbpf.linux.bpf.plan import Config
from ksbpf.linux.cgroup import cgroup2_mount
from ksbpf.linux.libbpf import prog_attach, prog_detach, prog_fd_by_id, prog_ids, prog_info, prog_query


@dataclass(frozen=True)
class Attached:
    """One of our programs on a cgroup, found by asking the kernel (pins may be gone)."""

    kind: str
    prog_id: int
    generation: int
    cgroup: Path


def _prog_config(prog_id: int) -> Config | None:
    """The live ks_config of an attached program, if it is one of ksbpf's."""
    try:
        fd = prog_fd_by_id(prog_id, f"open program id {prog_id}")
    except OSError:
        return None
    try:
        info = prog_info(fd)
    finally:
        os.close(fd)
    if info.name not in PROGS.values():
        return None
    maps: dict[str, BpfMap] = {}
    try:
        for mid in info.map_ids:
            try:
                m = BpfMap.by_id(mid)
            except OSError:
                continue
            if m.info.name in ("ks_active", "ks_config"):
                maps[m.info.name] = m
            else:
                m.close()
        if "ks_config" in maps and "ks_active" not in maps:
            return legacy_config(maps["ks_config"])
        if len(maps) < 2:
            return None
        live = active_config(maps["ks_active"], maps["ks_config"])
        return live[1] if live else None
    except OSError:
        return None
    finally:
        for m in maps.values():
            m.close()


def query_attached(cgroups: Iterable[Path], instance: str) -> list[Attached]:
    """An instance's programs attached to these cgroups, recognised by their ks_config."""
    found: list[Attached] = []
    for cg in cgroups:
        try:
            fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for kind, atype in ATTACH_TYPES.items():
                for pid in prog_query(fd, atype):
                    cfg = _prog_config(pid)
                    if cfg is not None and cfg.instance == instance:
                        found.append(Attached(kind, pid, cfg.generation, cg))
        except OSError as e:
            raise BpfError(f"cannot query programs on {cg}: {e.strerror}") from None
        finally:
            os.close(fd)
    return found


def loaded_programs(instance: str) -> dict[int, Config]:
    """An instance's programs loaded in the kernel however they are held (attached,
    pinned, an open descriptor), by their ks_config: id -> config."""
    out: dict[int, Config] = {}
    for pid in prog_ids():
        cfg = _prog_config(pid)
        if cfg is not None and cfg.instance == instance:
            out[pid] = cfg
    return out


def attached_anywhere(instance: str, first: Iterable[Path] = (), everywhere: bool = False) -> list[Attached]:
    """Where an instance's programs are attached, by asking the kernel, not the pins.
    Nothing of it loaded: [] at once. Else the cgroups in `first` are queried, then
    every cgroup of the cgroup2 tree: always when `everywhere` (a program may sit on
    more than one), else only while a loaded program is not found attached yet (it
    may be loaded but attached nowhere: pinned only, or held by an open descriptor).
    Raises OSError when the kernel refuses the asking."""
    ours = loaded_programs(instance)
    if not ours:
        return []
    found: list[Attached] = []
    queried: set[Path] = set()

    def query(cg: Path) -> None:
        queried.add(cg)
        try:
            fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # removed meanwhile
        try:
            for kind, atype in ATTACH_TYPES.items():
                for pid in prog_query(fd, atype):
                    if pid in ours:
                        found.append(Attached(kind, pid, ours[pid].generation, cg))
        finally:
            os.close(fd)

    for cg in first:
        if cg not in queried and cg.is_dir():
            query(cg)
    if everywhere or set(ours) - {a.prog_id for a in found}:
        try:
            mount = cgroup2_mount()
        except KsbpfError:
            return found
        for cg in cgroup_tree(mount):
            if cg not in queried:
                query(cg)
    return found


def describe_attached(attached: Iterable[Attached]) -> str:
    return ", ".join(f"{PROGS[a.kind]} #{a.prog_id} on {a.cgroup}" for a in attached)


def cgroup_tree(mount: Path) -> Iterator[Path]:
    """Every cgroup directory below `mount` (inclusive), parents first; cgroups removed
    meanwhile are skipped."""
    todo = [mount]
    while todo:
        d = todo.pop()
        yield d
        try:
            with os.scandir(d) as entries:
                todo.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue


def attach(gen: Generation, target: Path, previous: list[Attached]) -> str:
    """Swap the new generation in for the previous one. Returns how: "first" (nothing
    to replace), "atomic" (BPF_F_REPLACE in place) or "make-before-break"."""
    how = "atomic" if previous else "first"
    cg_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # Egress first: it is the enforcing half; sock_create only adds marks.
        for kind in ("egress", "sock_create"):
            new_fd = gen.prog_fd(kind)
            try:
                old = next((a for a in previous if a.kind == kind and a.cgroup == target), None)
                if old is not None and _replace(new_fd, cg_fd, kind, old):
                    continue
                if previous:
                    # Attach cgroup changed, old kernel, or old program gone: the old one
                    # stays until BpfLayer._retire, so both run meanwhile and nothing leaks.
                    how = "make-before-break"
                prog_attach(new_fd, cg_fd, ATTACH_TYPES[kind])
            except OSError as e:
                raise BpfError(f"attaching {kind} to {target}: {e.strerror}") from None
            finally:
                os.close(new_fd)
    finally:
        os.close(cg_fd)
    return how


def _replace(new_fd: int, cg_fd: int, kind: str, old: Attached) -> bool:
    try:
        old_fd = prog_fd_by_id(old.prog_id, "open old program")
    except OSError:
        return False
    try:
        prog_attach(new_fd, cg_fd, ATTACH_TYPES[kind], replace_fd=old_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(old_fd)


def detach(prog_id: int, kind: str, cgroup: Path) -> None:
    try:
        pfd = prog_fd_by_id(prog_id, "open program")
    except OSError:
        return
    try:
        cfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        os.close(pfd)
        return
    try:
        prog_detach(pfd, cfd, ATTACH_TYPES[kind])
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise BpfError(f"detaching {kind} #{prog_id} from {cgroup}: {e.strerror}") from None
    finally:
        os.close(pfd)
        os.close(cfd)


def discard(gen: Generation, target: Path) -> None:
    for kind in PROGS:
        pid = gen.prog_id(kind)
        if pid is not None:
            detach(pid, kind, target)
    shutil.rmtree(gen.path, ignore_errors=True)


def reattach(gen: Generation, target: Path, found: Iterable[Attached]) -> list[str]:
    """Attach the generation's programs where they are missing from `target` (`found`:
    what is attached there now)."""
    repaired: list[str] = []
    attached = {(a.kind, a.prog_id) for a in found}
    for kind in PROGS:
        pid = gen.prog_id(kind)
        if pid is None or (kind, pid) in attached:
            continue
        try:
            pfd = gen.prog_fd(kind)
        except OSError as e:
            raise BpfError(f"re-attaching {kind}: {e.strerror}") from None
        try:
            cfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                prog_attach(pfd, cfd, ATTACH_TYPES[kind])
                repaired.append(kind)
            finally:
                os.close(cfd)
        except OSError as e:
            raise BpfError(f"re-attaching {kind}: {e.strerror}") from None
        finally:
            os.close(pfd)
    return repaired
