"""Typed errors. Library exceptions are wrapped at the boundary into one of these."""

from __future__ import annotations


class KsbpfError(Exception):
    """Base of every error ksbpf raises on purpose."""


class PolicyError(KsbpfError):
    """A policy (file, CLI argument or request) is malformed; nothing was applied."""

    def __init__(self, reason: str, *, source: str = "<policy>", key: str = "") -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + reason)


class BackendError(KsbpfError):
    """A kernel layer (nftables, routing) refused or failed a change."""

    def __init__(self, layer: str, reason: str) -> None:
        self.layer = layer
        self.reason = reason
        super().__init__(f"{layer}: {reason}")


class BpfError(BackendError):
    """The cgroup-bpf layer could not compile, load or attach."""

    def __init__(self, reason: str) -> None:
        super().__init__("bpf", reason)


class CapacityError(BpfError):
    """A policy holds more than the BPF maps can: bad input, whichever layer noticed."""


class CgroupError(PolicyError):
    """A cgroup path is invalid, escapes the cgroup2 mount, or does not exist."""
