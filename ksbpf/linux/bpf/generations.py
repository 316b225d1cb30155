"""A generation as the kernel holds it: its pinned directory, maps, live config (read back
from ks_active and ks_config) and programs."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ksbpf.linux.bpf.kernel import BpfMap
from ksbpf.linux.bpf.layout import LEGACY_CONFIG_FMT
from ksbpf.linux.bpf.plan import Config
from ksbpf.linux.libbpf import obj_get, prog_info
from ksbpf.render.bpf import Capacity

KEY0 = struct.pack("<I", 0)


def active_config(active: BpfMap, configs: BpfMap) -> tuple[int, Config] | None:
    """(slot, config) of the version packets use now."""
    raw = active.lookup(KEY0)
    if raw is None:
        return None
    slot = struct.unpack("<I", raw)[0] & 1
    cfg = configs.lookup(struct.pack("<I", slot))
    return (slot, Config.unpack(cfg)) if cfg else None


@dataclass
class Generation:
    number: int
    path: Path

    def map(self, name: str) -> BpfMap:
        return BpfMap.pinned(self.path / name)

    def active(self) -> tuple[int, Config] | None:
        try:
            with self.map("ks_active") as a, self.map("ks_config") as c:
                return active_config(a, c)
        except OSError:
            return None

    def config(self) -> Config | None:
        live = self.active()
        if live is None and not (self.path / "ks_active").exists():
            try:
                with self.map("ks_config") as c:
                    return legacy_config(c)
            except OSError:
                return None
        return live[1] if live else None

    def capacity(self) -> Capacity | None:
        """What the generation was built to hold, from its endpoint map's size."""
        try:
            with self.map("ks_endpoints") as m:
                return Capacity(m.info.max_entries // 2)
        except OSError:
            return None

    def prog_fd(self, kind: str) -> int:
        return obj_get(self.path / kind)

    def prog_id(self, kind: str) -> int | None:
        try:
            fd = self.prog_fd(kind)
        except OSError:
            return None
        try:
            return prog_info(fd).id
        finally:
            os.close(fd)


def legacy_config(configs: BpfMap) -> Config | None:
    """The one-version ks_config of programs from before policy versions: recognised, so
    that an upgrade replaces and `down` removes them."""
    if configs.info.value_size != struct.calcsize(LEGACY_CONFIG_FMT):
        return None
    raw = configs.lookup(KEY0)
    if raw is None:
        return None
    c, g, cg, fl, m, inst = struct.unpack_from(LEGACY_CONFIG_FMT, raw)
    return Config(c, g, cg, fl, m, inst.split(b"\0", 1)[0].decode(errors="replace"))
