"""Where cgroup2 is mounted, read from /proc/mounts. Standard library only: ksctl's light
client path (ksbpf.sockmark) needs it without the policy parser or ksbpf.linux."""

from __future__ import annotations

from pathlib import Path


def cgroup2_mount_point(mounts: str = "/proc/mounts") -> Path | None:
    """The first cgroup2 mount (/sys/fs/cgroup unified, .../unified hybrid), or None.
    Raises OSError when `mounts` cannot be read."""
    with open(mounts, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1].replace("\\040", " "))
    return None
